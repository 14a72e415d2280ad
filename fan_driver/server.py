"""Docker's plugin protocol over a unix socket: JSON in, one driver call, JSON out.

Only translation lives here: a table maps each path to the driver method it
calls, and one middleware turns every failure into Docker's {"Err": ...}.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import re
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict

from aiohttp import web

from .errors import FanError, NotFound
from .ipam import IpamDriver
from .network import NetworkDriver
from .ports import Publication

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"
# The calls dockerd makes without a body. Any other call with an empty body is
# dockerd's plugin client retrying a request that got no answer (the plugin
# stopped while handling it): it re-sends the body it already consumed. Such a
# call must fail, not be taken as one with every field left out.
BODILESS = {"/Plugin.Activate", "/NetworkDriver.GetCapabilities",
            "/IpamDriver.GetCapabilities", "/IpamDriver.GetDefaultAddressSpaces"}
MAX_BODY = 1 << 20   # Docker's requests are a few KB; refuse anything absurd.
MAX_MESSAGE = 1000

Handler = Callable[[Dict[str, Any]], Awaitable[dict]]


class BadRequest(FanError):
    pass


# Docker's network and endpoint IDs (stringid.GenerateRandomID): they end up in
# interface names, marks and firewall comments, so nothing else is let in.
DOCKER_ID = re.compile(r"[0-9a-f]{64}")


def docker_id(body: dict, key: str) -> str:
    value = field(body, key, str)
    if not DOCKER_ID.fullmatch(value):
        raise BadRequest(f"request field {key} must be a Docker ID (64 hexadecimal digits), "
                         f"not {value[:80]!r}")
    return value


def field(body: dict, key: str, kind: type, default: Any = None) -> Any:
    value = body.get(key, default)
    if value is None:
        value = default
    if value is None:
        raise BadRequest(f"request is missing {key}")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"request field {key} must be a {_kind_name(kind)}")
    return value


def _kind_name(kind) -> str:
    return {str: "string", dict: "JSON object", list: "JSON list", bool: "boolean"}.get(kind, kind.__name__)


def routes(network: NetworkDriver, ipam: IpamDriver) -> Dict[str, Handler]:
    def n(b):
        return docker_id(b, "NetworkID")

    def e(b):
        return docker_id(b, "EndpointID")

    return {
        "/Plugin.Activate": lambda b: _const({"Implements": ["NetworkDriver", "IpamDriver"]}),
        "/NetworkDriver.GetCapabilities": lambda b: network.capabilities(),
        "/NetworkDriver.CreateNetwork": lambda b: network.create_network(
            n(b), field(b, "Options", dict, {}), field(b, "IPv4Data", list, []),
            field(b, "IPv6Data", list, [])),
        "/NetworkDriver.DeleteNetwork": lambda b: network.delete_network(n(b)),
        "/NetworkDriver.CreateEndpoint": lambda b: network.create_endpoint(
            n(b), e(b), field(b, "Interface", dict, {})),
        "/NetworkDriver.DeleteEndpoint": lambda b: network.delete_endpoint(
            n(b), e(b)),
        "/NetworkDriver.EndpointOperInfo": lambda b: network.endpoint_info(
            n(b), e(b)),
        "/NetworkDriver.Join": lambda b: network.join(n(b), e(b)),
        "/NetworkDriver.Leave": lambda b: network.leave(n(b), e(b)),
        "/NetworkDriver.DiscoverNew": lambda b: _const({}),
        "/NetworkDriver.DiscoverDelete": lambda b: _const({}),
        "/NetworkDriver.ProgramExternalConnectivity": lambda b: network.program_external_connectivity(
            n(b), e(b), Publication.from_options(field(b, "Options", dict, {}))),
        "/NetworkDriver.RevokeExternalConnectivity": lambda b: network.revoke_external_connectivity(
            n(b), e(b)),
        "/NetworkDriver.GwAllocCheck": lambda b: network.gateway_allocation(
            field(b, "Options", dict, {})),
        "/NetworkDriver.AllocateNetwork": lambda b: _const({}),
        "/NetworkDriver.FreeNetwork": lambda b: _const({}),
        "/IpamDriver.GetCapabilities": lambda b: ipam.capabilities(),
        "/IpamDriver.GetDefaultAddressSpaces": lambda b: ipam.default_address_spaces(),
        "/IpamDriver.RequestPool": lambda b: ipam.request_pool(
            field(b, "Pool", str, ""), field(b, "SubPool", str, ""),
            field(b, "Options", dict, {}), field(b, "V6", bool, False)),
        "/IpamDriver.ReleasePool": lambda b: ipam.release_pool(field(b, "PoolID", str)),
        "/IpamDriver.RequestAddress": lambda b: ipam.request_address(
            field(b, "PoolID", str), field(b, "Address", str, ""), field(b, "Options", dict, {})),
        "/IpamDriver.ReleaseAddress": lambda b: ipam.release_address(
            field(b, "PoolID", str), field(b, "Address", str)),
    }


async def _const(value: dict) -> dict:
    return value


def _reply(status: int, body: dict) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def make_app(network: NetworkDriver, ipam: IpamDriver) -> web.Application:
    table = routes(network, ipam)

    async def dispatch(request: web.Request) -> web.Response:
        handler = table.get(request.path)
        if handler is None:
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
        return _reply(200, await handler(body))

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
