"""The managed plugin's guard: with an invalid setting or a state file it
cannot read, keep the plugin socket up and answer every Docker request with
the problem and its fix. A managed
plugin whose process exits is reported by `docker plugin enable` only as a
socket it could not dial, after seconds of retries."""
from __future__ import annotations

from pathlib import Path
from typing import NoReturn

from .drivers import IpamDriverApi, NetworkDriverApi
from .errors import FanError
from .ipam import IpamDriver
from .network import NetworkDriver
from .protocol import (AddressGranted, AddressRelease, AddressRequest, CreateEndpoint,
                        CreateNetwork, EndpointCreated, EndpointInfo, EndpointRef,
                        ExternalConnectivity, GatewayAllocation, GatewayCheck, JoinInfo,
                        NetworkRef, PoolGranted, PoolRef, PoolRequest)
from .server import make_app, serve_until_stopped


class _Refusing:
    """Stands in for a driver: its calls refuse with the message."""

    def __init__(self, message: str):
        self.message = message

    def _refuse(self) -> NoReturn:
        raise FanError(self.message)


class _RefusingNetwork(_Refusing, NetworkDriverApi):
    capabilities = NetworkDriver.capabilities

    async def gateway_allocation(self, request: GatewayCheck) -> GatewayAllocation:
        self._refuse()

    async def create_network(self, request: CreateNetwork) -> None:
        self._refuse()

    async def delete_network(self, request: NetworkRef) -> None:
        self._refuse()

    async def create_endpoint(self, request: CreateEndpoint) -> EndpointCreated:
        self._refuse()

    async def delete_endpoint(self, request: EndpointRef) -> None:
        self._refuse()

    async def endpoint_info(self, request: EndpointRef) -> EndpointInfo:
        self._refuse()

    async def join(self, request: EndpointRef) -> JoinInfo:
        self._refuse()

    async def leave(self, request: EndpointRef) -> None:
        self._refuse()

    async def program_external_connectivity(self, request: ExternalConnectivity) -> None:
        self._refuse()

    async def revoke_external_connectivity(self, request: EndpointRef) -> None:
        self._refuse()


class _RefusingIpam(_Refusing, IpamDriverApi):
    capabilities = IpamDriver.capabilities
    default_address_spaces = IpamDriver.default_address_spaces

    async def request_pool(self, request: PoolRequest) -> PoolGranted:
        self._refuse()

    async def release_pool(self, request: PoolRef) -> None:
        self._refuse()

    async def request_address(self, request: AddressRequest) -> AddressGranted:
        self._refuse()

    async def release_address(self, request: AddressRelease) -> None:
        self._refuse()


def refusal_app(message: str):
    """An aiohttp app on Docker's plugin protocol answering every driver call
    with `message` (Activate, capabilities and address spaces still answer, so
    Docker registers the drivers and shows the message on use)."""
    return make_app(_RefusingNetwork(message), _RefusingIpam(message))


async def serve_refusal(socket_path: Path, message: str) -> None:
    await serve_until_stopped(refusal_app(message), socket_path)
