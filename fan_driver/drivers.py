"""What the protocol edge (server.py) calls on the two drivers, and what the
IPAM asks of the network driver: three declared interfaces.

Each method of NetworkDriverApi and IpamDriverApi is one route of server.py,
taking and returning protocol.py's types. Implementations subclass these
protocols, so a missing or renamed method makes the class impossible to
instantiate (the methods are abstract), and tests/unit/test_interfaces.py checks
that no implementation, the refusing stand-ins included, has public methods the
protocol does not declare.
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Protocol

from .model import State
from .protocol import (AddressGranted, AddressRelease, AddressRequest, AddressSpaces,
                       CreateEndpoint, CreateNetwork, EndpointCreated, EndpointInfo,
                       EndpointRef, ExternalConnectivity, GatewayAllocation, GatewayCheck,
                       IpamCapabilities, JoinInfo, NetworkCapabilities, NetworkRef,
                       PoolGranted, PoolRef, PoolRequest)


class NetworkDriverApi(Protocol):
    """Docker's NetworkDriver calls that the fan answers (the others are
    answered with {} by server.py alone)."""

    @abstractmethod
    async def capabilities(self) -> NetworkCapabilities:
        """GetCapabilities."""

    @abstractmethod
    async def gateway_allocation(self, request: GatewayCheck) -> GatewayAllocation:
        """GwAllocCheck."""

    @abstractmethod
    async def create_network(self, request: CreateNetwork) -> None:
        """CreateNetwork."""

    @abstractmethod
    async def delete_network(self, request: NetworkRef) -> None:
        """DeleteNetwork."""

    @abstractmethod
    async def create_endpoint(self, request: CreateEndpoint) -> EndpointCreated:
        """CreateEndpoint."""

    @abstractmethod
    async def delete_endpoint(self, request: EndpointRef) -> None:
        """DeleteEndpoint."""

    @abstractmethod
    async def endpoint_info(self, request: EndpointRef) -> EndpointInfo:
        """EndpointOperInfo."""

    @abstractmethod
    async def join(self, request: EndpointRef) -> JoinInfo:
        """Join."""

    @abstractmethod
    async def leave(self, request: EndpointRef) -> None:
        """Leave."""

    @abstractmethod
    async def program_external_connectivity(self, request: ExternalConnectivity) -> None:
        """ProgramExternalConnectivity: publish the endpoint's ports."""

    @abstractmethod
    async def revoke_external_connectivity(self, request: EndpointRef) -> None:
        """RevokeExternalConnectivity: the endpoint's published ports go."""


class IpamDriverApi(Protocol):
    """Docker's IpamDriver calls."""

    @abstractmethod
    async def capabilities(self) -> IpamCapabilities:
        """GetCapabilities."""

    @abstractmethod
    async def default_address_spaces(self) -> AddressSpaces:
        """GetDefaultAddressSpaces."""

    @abstractmethod
    async def request_pool(self, request: PoolRequest) -> PoolGranted:
        """RequestPool."""

    @abstractmethod
    async def release_pool(self, request: PoolRef) -> None:
        """ReleasePool."""

    @abstractmethod
    async def request_address(self, request: AddressRequest) -> AddressGranted:
        """RequestAddress."""

    @abstractmethod
    async def release_address(self, request: AddressRelease) -> None:
        """ReleaseAddress."""


class NetworkRemoval(Protocol):
    """What the IPAM asks of the network driver: removing the network or the
    endpoint that still holds a pool or an address Docker releases. The caller
    holds the ledger (change()) and passes its state."""

    @abstractmethod
    async def remove_network(self, state: State, network_id: str) -> None:
        """Forget the network and its pool, then remove its kernel objects."""

    @abstractmethod
    async def remove_endpoint(self, state: State, network_id: str, endpoint_id: str) -> None:
        """Forget the endpoint, then delete its veth."""
