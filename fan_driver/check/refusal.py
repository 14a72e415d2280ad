"""The managed plugin's guard: with an invalid setting, keep the plugin socket
up and answer every Docker request with the problem and its fix. A managed
plugin whose process exits is reported by `docker plugin enable` only as a
socket it could not dial, after seconds of retries."""
from __future__ import annotations

from pathlib import Path

from ..errors import FanError
from ..ipam import IpamDriver
from ..network import NetworkDriver
from ..server import make_app, serve_until_stopped


class _Refusing:
    """Stands in for a driver: every method it does not define refuses."""

    def __init__(self, message: str):
        self.message = message

    def __getattr__(self, name):
        async def refuse(*_args, **_kwargs):
            raise FanError(self.message)
        return refuse


class _RefusingNetwork(_Refusing):
    capabilities = NetworkDriver.capabilities


class _RefusingIpam(_Refusing):
    capabilities = IpamDriver.capabilities
    default_address_spaces = IpamDriver.default_address_spaces


def refusal_app(message: str):
    """An aiohttp app on Docker's plugin protocol answering every driver call
    with `message` (Activate, capabilities and address spaces still answer, so
    Docker registers the drivers and shows the message on use)."""
    return make_app(_RefusingNetwork(message), _RefusingIpam(message))


async def serve_refusal(socket_path: Path, message: str) -> None:
    await serve_until_stopped(refusal_app(message), socket_path)
