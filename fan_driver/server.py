"""Docker's plugin protocol over a unix socket: JSON in, one driver call, JSON out.

Only translation lives here: a table maps each path to how its body is decoded
(protocol.py), the driver method it calls and how the reply is encoded, and one
middleware turns every failure into Docker's {"Err": ...}.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, NamedTuple, Optional

from aiohttp import web

from . import protocol as p
from .drivers import IpamDriverApi, NetworkDriverApi
from .errors import FanError, NotFound
from .protocol import BadRequest

log = logging.getLogger(__name__)

# The calls dockerd makes without a body. Any other call with an empty body is
# dockerd's plugin client retrying a request that got no answer (the plugin
# stopped while handling it): it re-sends the body it already consumed. Such a
# call must fail, not be taken as one with every field left out.
BODILESS = {"/Plugin.Activate", "/NetworkDriver.GetCapabilities",
            "/IpamDriver.GetCapabilities", "/IpamDriver.GetDefaultAddressSpaces"}
MAX_BODY = 1 << 20   # Docker's requests are a few KB; refuse anything absurd.
MAX_MESSAGE = 1000


class Route(NamedTuple):
    """One method of the protocol: the driver call and how what it takes is
    decoded from the body (None: it takes nothing). Replies are encoded alike."""
    call: Callable[..., Awaitable[Any]]
    decode: Optional[Callable[[dict], Any]] = None


async def _activate() -> p.Activation:
    return p.Activation()


async def _nothing() -> None:
    """Calls the fan answers with {} whatever they carry."""


def routes(network: NetworkDriverApi, ipam: IpamDriverApi) -> Dict[str, Route]:
    return {
        "/Plugin.Activate": Route(_activate),
        "/NetworkDriver.GetCapabilities": Route(network.capabilities),
        "/NetworkDriver.CreateNetwork": Route(network.create_network, p.CreateNetwork.decode),
        "/NetworkDriver.DeleteNetwork": Route(network.delete_network, p.NetworkRef.decode),
        "/NetworkDriver.CreateEndpoint": Route(network.create_endpoint, p.CreateEndpoint.decode),
        "/NetworkDriver.DeleteEndpoint": Route(network.delete_endpoint, p.EndpointRef.decode),
        "/NetworkDriver.EndpointOperInfo": Route(network.endpoint_info, p.EndpointRef.decode),
        "/NetworkDriver.Join": Route(network.join, p.EndpointRef.decode),
        "/NetworkDriver.Leave": Route(network.leave, p.EndpointRef.decode),
        "/NetworkDriver.DiscoverNew": Route(_nothing),
        "/NetworkDriver.DiscoverDelete": Route(_nothing),
        "/NetworkDriver.ProgramExternalConnectivity": Route(
            network.program_external_connectivity, p.ExternalConnectivity.decode),
        "/NetworkDriver.RevokeExternalConnectivity": Route(
            network.revoke_external_connectivity, p.EndpointRef.decode),
        "/NetworkDriver.GwAllocCheck": Route(network.gateway_allocation, p.GatewayCheck.decode),
        "/NetworkDriver.AllocateNetwork": Route(_nothing),
        "/NetworkDriver.FreeNetwork": Route(_nothing),
        "/IpamDriver.GetCapabilities": Route(ipam.capabilities),
        "/IpamDriver.GetDefaultAddressSpaces": Route(ipam.default_address_spaces),
        "/IpamDriver.RequestPool": Route(ipam.request_pool, p.PoolRequest.decode),
        "/IpamDriver.ReleasePool": Route(ipam.release_pool, p.PoolRef.decode),
        "/IpamDriver.RequestAddress": Route(ipam.request_address, p.AddressRequest.decode),
        "/IpamDriver.ReleaseAddress": Route(ipam.release_address, p.AddressRelease.decode),
    }


async def answer(route: Route, body: dict) -> dict:
    """The reply to a request's body: decoded, served, encoded."""
    if route.decode is None:
        return p.encode(await route.call())
    return p.encode(await route.call(route.decode(body)))


def _reply(status: int, body: dict) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def make_app(network: NetworkDriverApi, ipam: IpamDriverApi) -> web.Application:
    table = routes(network, ipam)

    async def dispatch(request: web.Request) -> web.Response:
        route = table.get(request.path)
        if route is None:
            return _reply(404, {"Err": f"unknown method {request.path[1:]}"})
        raw = await request.read()
        if not raw.strip() and request.path not in BODILESS:
            raise BadRequest("the request body is empty: dockerd re-sends a request with an "
                             "empty body when the plugin stopped before answering it; run "
                             "the command again")
        try:
            body = json.loads(raw) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise BadRequest("request body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        log.debug("%s %s", request.path, raw[:2000].decode(errors="replace"))
        return _reply(200, await answer(route, body))

    @web.middleware
    async def errors(request: web.Request, handler) -> web.Response:
        try:
            return await handler(request)
        except FanError as exc:
            message = str(exc)
            if len(message) > MAX_MESSAGE:    # it may quote a huge hostile value
                message = message[:MAX_MESSAGE] + "... (cut)"
            log.log(logging.INFO if isinstance(exc, NotFound) else logging.WARNING,
                    "%s: %s", request.path[1:], message)
            return _reply(500, {"Err": message})
        except web.HTTPRequestEntityTooLarge:
            return _reply(413, {"Err": f"request body is larger than {MAX_BODY} bytes"})
        except web.HTTPException as exc:
            return _reply(exc.status, {"Err": exc.reason})
        except Exception as exc:  # a bug: keep serving, tell Docker, log the trace
            log.exception("%s failed", request.path[1:])
            return _reply(500, {"Err": f"fan-driver internal error: {exc!r}"})

    app = web.Application(middlewares=[errors], client_max_size=MAX_BODY)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


async def start(app: web.Application, socket_path: Path) -> web.AppRunner:
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    if socket_path.is_socket():
        socket_path.unlink()   # left by a process that died
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    old_umask = os.umask(0o177)   # the socket is root's alone from the first instant
    try:
        await web.UnixSite(runner, str(socket_path)).start()
    finally:
        os.umask(old_umask)
    os.chmod(socket_path, 0o600)
    return runner


async def serve_until_stopped(app: web.Application, socket_path: Path) -> None:
    """Serve on the socket until SIGTERM or SIGINT."""
    runner = await start(app, socket_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
