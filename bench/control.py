"""Control plane: what a fan network adds to `docker run`, each plugin method's
latency under 100 concurrent requests, and the plugin's memory.

The API benchmark drives a plugin of its own (in the lab's `api` namespace, no
dockerd) the way dockerd does: a network, then N endpoints through the whole
container life cycle, every step with up to 100 requests in flight. Its
baseline is Plugin.Activate, which does no work: what is left is the method's
own cost (and its wait for the plugin's single state lock).
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid

from tests.harness.unixhttp import PLUGIN_CONTENT_TYPE

from .lab import BenchLab, FanHost
from .results import Report, Row, median, percentile

SECTION_RUN = "control plane: docker run"
SECTION_API = "control plane: plugin API"
SECTION_MEM = "control plane: plugin memory"
CONCURRENCY = 100
SEQUENTIAL = 20   # endpoints taken through the life cycle one request at a time
PORT_RANGE = 1000   # -p 20000-20999:20000-20999, programmed in one batch
API_OVERLAY, API_UNDERLAY = "250.0.0.0/8", "172.30.0.0/16"
LIFE_CYCLE = ("IpamDriver.RequestAddress", "NetworkDriver.CreateEndpoint",
              "NetworkDriver.Join", "NetworkDriver.EndpointOperInfo", "NetworkDriver.Leave",
              "NetworkDriver.DeleteEndpoint", "IpamDriver.ReleaseAddress")


# -- docker run --net fan vs --net bridge ---------------------------------------------
# Docker gives every container on a user-defined network (any driver, its own
# bridge included) an embedded DNS server, set up with iptables rules inside
# the container's namespace; the default bridge has none. A user-defined
# bridge network shows what that costs, apart from the fan.
USER_BRIDGE = "bench-user-bridge"


def docker_run_times(h: FanHost, fan_net: str, runs: int, warmup: int, log) -> dict:
    """Interleaved `docker run --rm --net X busybox true`, in a rotated order."""
    nets = {"fan": fan_net, "bridge": "bridge", "user bridge": USER_BRIDGE}
    if USER_BRIDGE not in h.cli("network", "ls", "--format", "{{.Name}}").stdout.split():
        h.cli("network", "create", "-d", "bridge", USER_BRIDGE)
    times = {kind: [] for kind in nets}
    kinds = list(nets)
    for i in range(warmup + runs):
        for kind in kinds[i % 3:] + kinds[:i % 3]:
            started = time.monotonic()
            h.cli("run", "--rm", "--net", nets[kind], "busybox", "true", timeout=120)
            if i >= warmup:
                times[kind].append(time.monotonic() - started)
    log("docker run medians over " f"{runs} each: " +
        ", ".join(f"{kind} {median(t):.3f} s" for kind, t in times.items()))
    return times


def run_rows(times: dict, report: Report) -> None:
    fan, bridge, user = (median(times[k]) for k in ("fan", "bridge", "user bridge"))
    note = (f"median of {len(times['fan'])} each, interleaved; p90 " +
            ", ".join(f"{kind} {percentile(t, 90):.3f} s" for kind, t in times.items()))
    report.add(Row(SECTION_RUN, "docker run --rm busybox true: --net fan vs --net bridge",
                   fan, bridge, "s", target=("<=", 1.10), note=note))
    report.add(Row(SECTION_RUN, "  a user-defined bridge network vs --net bridge", user, bridge,
                   "s", note="Docker's own cost of any user-defined network: embedded DNS"))
    report.add(Row(SECTION_RUN, "  --net fan vs a user-defined bridge network", fan, user, "s",
                   note="what the fan adds over Docker's own driver on a like network"))


# -- the plugin API -------------------------------------------------------------------

class Client:
    """Requests to the plugin's socket as dockerd makes them, with latencies."""

    def __init__(self, socket_path: str, concurrency: int = CONCURRENCY):
        import aiohttp
        self._aiohttp = aiohttp
        self.socket_path = str(socket_path)
        self.concurrency = concurrency
        self.session = None

    async def __aenter__(self) -> "Client":
        connector = self._aiohttp.UnixConnector(path=self.socket_path, limit=self.concurrency)
        self.session = self._aiohttp.ClientSession(
            connector=connector, timeout=self._aiohttp.ClientTimeout(total=300))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def call(self, method: str, body: dict) -> tuple[float, dict]:
        started = time.perf_counter()
        async with self.session.post(f"http://plugin/{method}", data=json.dumps(body),
                                     headers={"Content-Type": PLUGIN_CONTENT_TYPE}) as resp:
            raw = await resp.read()
            status = resp.status
        elapsed = time.perf_counter() - started
        answer = json.loads(raw) if raw.strip() else {}
        if status != 200:
            raise RuntimeError(f"{method}: HTTP {status}: {answer}")
        return elapsed, answer

    async def many(self, method: str, bodies: list) -> tuple[list, list]:
        """All bodies, at most `concurrency` in flight: (latencies, answers)."""
        gate = asyncio.Semaphore(self.concurrency)

        async def one(body):
            async with gate:
                return await self.call(method, body)
        done = await asyncio.gather(*(one(b) for b in bodies))
        return [d[0] for d in done], [d[1] for d in done]


async def open_network(c: "Client") -> tuple:
    """A fan network as dockerd makes one: (pool ID, gateway answer, network ID)."""
    _, pool = await c.call("IpamDriver.RequestPool", {
        "AddressSpace": "fan", "Pool": API_OVERLAY, "SubPool": "",
        "Options": {"underlay": API_UNDERLAY}, "V6": False})
    pool_id = pool["PoolID"]
    _, gw = await c.call("IpamDriver.RequestAddress", {
        "PoolID": pool_id, "Address": "",
        "Options": {"RequestAddressType": "com.docker.network.gateway"}})
    network_id = uuid.uuid4().hex * 2
    await c.call("NetworkDriver.CreateNetwork", {
        "NetworkID": network_id,
        "Options": {"com.docker.network.enable_ipv6": False,
                    "com.docker.network.generic": {"encap": "vxlan", "mapping": "ebpf"}},
        "IPv4Data": [{"AddressSpace": "fan", "Pool": API_OVERLAY,
                      "Gateway": gw["Address"]}], "IPv6Data": []})
    return pool_id, gw, network_id


async def close_network(c: "Client", pool_id: str, gw: dict, network_id: str) -> None:
    await c.call("NetworkDriver.DeleteNetwork", {"NetworkID": network_id})
    await c.call("IpamDriver.ReleaseAddress", {"PoolID": pool_id,
                                               "Address": gw["Address"].split("/")[0]})
    await c.call("IpamDriver.ReleasePool", {"PoolID": pool_id})


def port_map(first: int, count: int) -> dict:
    """`-p first-last:first-last` as dockerd hands it to ProgramExternalConnectivity."""
    return {"com.docker.network.portmap": [
        {"Proto": 6, "IP": "", "Port": p, "HostIP": "", "HostPort": p, "HostPortEnd": p}
        for p in range(first, first + count)]}


async def publish_times(socket_path: str, sizes=(1, PORT_RANGE), rounds: int = 3) -> dict:
    """{ports: [seconds]} for ProgramExternalConnectivity of one endpoint with a
    range of that many ports (each round revoked again)."""
    times = {size: [] for size in sizes}
    async with Client(socket_path, 1) as c:
        pool_id, gw, network_id = await open_network(c)
        _, addr = await c.call("IpamDriver.RequestAddress",
                               {"PoolID": pool_id, "Address": "", "Options": None})
        ep = {"NetworkID": network_id, "EndpointID": uuid.uuid4().hex * 2}
        await c.call("NetworkDriver.CreateEndpoint", {
            **ep, "Interface": {"Address": addr["Address"], "AddressIPv6": "", "MacAddress": ""},
            "Options": {}})
        for _ in range(rounds):
            for size in sizes:
                seconds, _ = await c.call("NetworkDriver.ProgramExternalConnectivity",
                                              {**ep, "Options": port_map(20000, size)})
                times[size].append(seconds)
                await c.call("NetworkDriver.RevokeExternalConnectivity", ep)
        await c.call("NetworkDriver.DeleteEndpoint", ep)
        await c.call("IpamDriver.ReleaseAddress",
                     {"PoolID": pool_id, "Address": addr["Address"].split("/")[0]})
        await close_network(c, pool_id, gw, network_id)
    return times


async def life_cycle(socket_path: str, endpoints: int, pid: int,
                     concurrency: int = CONCURRENCY) -> dict:
    """Network, `endpoints` endpoints through every step, network gone again.
    Returns {method: latencies} and the plugin's RSS with all endpoints joined."""
    latencies, rss = {}, None
    async with Client(socket_path, concurrency) as c:
        latencies["Plugin.Activate"], _ = await c.many("Plugin.Activate", [{}] * endpoints)
        pool_id, gw, network_id = await open_network(c)
        eids = [uuid.uuid4().hex * 2 for _ in range(endpoints)]
        lat, answers = await c.many("IpamDriver.RequestAddress",
                                    [{"PoolID": pool_id, "Address": "", "Options": None}] *
                                    endpoints)
        latencies["IpamDriver.RequestAddress"] = lat
        addrs = [a["Address"] for a in answers]
        ep = [{"NetworkID": network_id, "EndpointID": e} for e in eids]
        steps = [
            ("NetworkDriver.CreateEndpoint", [
                {**b, "Interface": {"Address": a, "AddressIPv6": "", "MacAddress": ""},
                 "Options": {}} for b, a in zip(ep, addrs)]),
            ("NetworkDriver.Join", [{**b, "SandboxKey": f"/var/run/docker/netns/{e[:12]}",
                                     "Options": {}} for b, e in zip(ep, eids)]),
            ("NetworkDriver.EndpointOperInfo", ep),
            ("RSS", None),
            ("NetworkDriver.Leave", ep),
            ("NetworkDriver.DeleteEndpoint", ep),
            ("IpamDriver.ReleaseAddress", [{"PoolID": pool_id, "Address": a.split("/")[0]}
                                           for a in addrs]),
        ]
        for method, bodies in steps:
            if method == "RSS":
                rss = rss_mib(pid)
                continue
            latencies[method], _ = await c.many(method, bodies)
        await close_network(c, pool_id, gw, network_id)
    return {"latency_ms": {m: [x * 1000 for x in v] for m, v in latencies.items()},
            "rss_endpoints_mib": rss}


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def bare_python_rss() -> float:
    """The floor: a Python that has imported what the plugin imports, doing nothing."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import asyncio, aiohttp.web, pyroute2, sys; print('ready', "
                               "flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        return rss_mib(proc.pid)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def api_rows(data: dict, endpoints: int, report: Report, docker_run: dict | None) -> None:
    lat = data["latency_ms"]
    base = lat["Plugin.Activate"]
    b50, b99 = percentile(base, 50), percentile(base, 99)
    note = f"{endpoints} requests, {CONCURRENCY} in flight"
    report.add(Row(SECTION_API, "p50 Plugin.Activate (the baseline: no work)", b50, b50, "ms",
                   note=f"{note}; p99 {b99:.1f} ms"))
    for method in LIFE_CYCLE:
        v = lat[method]
        report.add(Row(SECTION_API, f"p50 {method} vs Activate", percentile(v, 50), b50, "ms"))
        report.add(Row(SECTION_API, f"p99 {method} vs Activate", percentile(v, 99), b99, "ms"))
    alone = data["sequential_ms"]
    per_container = sum(median(alone[m]) for m in LIFE_CYCLE)
    detail = ", ".join(f"{m.split('.')[1]} {median(alone[m]):.1f}" for m in LIFE_CYCLE)
    if docker_run:
        report.add(Row(SECTION_API, "plugin time per container, one request at a time, vs "
                                    "docker run --net bridge", per_container,
                       median(docker_run["bridge"]) * 1000, "ms",
                       note=f"median ms of {SEQUENTIAL} sequential calls: {detail}"))
    else:
        report.add(Row(SECTION_API, "plugin time per container, one request at a time, vs "
                                    "Activate", per_container, median(alone["Plugin.Activate"]),
                       "ms", note=f"median ms of {SEQUENTIAL} sequential calls: {detail}"))


def run(bl: BenchLab, report: Report, short: bool, fan_net: str, log) -> None:
    h = bl.hosts["h28"]
    runs, warmup = (3, 1) if short else (25, 2)
    times = docker_run_times(h, fan_net, runs, warmup, log)
    report.raw["docker_run_s"] = times
    run_rows(times, report)


def run_api(bl: BenchLab, report: Report, short: bool, log) -> None:
    endpoints = 100 if short else 250
    plugin = bl.plugin(bl.api_host, "api")
    plugin.start()
    try:
        time.sleep(1)   # let it settle after start
        idle, floor = rss_mib(plugin.pid), bare_python_rss()
        # One request at a time first: each method's own service time.
        alone = asyncio.run(life_cycle(plugin.socket_path, SEQUENTIAL, plugin.pid, 1))
        data = asyncio.run(life_cycle(plugin.socket_path, endpoints, plugin.pid))
        published = asyncio.run(publish_times(plugin.socket_path))
    finally:
        plugin.close()
    data.update(rss_idle_mib=idle, rss_floor_mib=floor, endpoints=endpoints,
                sequential_ms=alone["latency_ms"])
    report.raw["api"] = data
    log(f"plugin API: {endpoints} endpoints; RSS idle {idle:.1f} MiB, "
        f"with endpoints {data['rss_endpoints_mib']:.1f} MiB")
    api_rows(data, endpoints, report, report.raw.get("docker_run_s"))
    report.raw["publish_s"] = published
    report.add(Row(SECTION_API, f"ProgramExternalConnectivity, {PORT_RANGE}-port range vs "
                                "one port", median(published[PORT_RANGE]) * 1000,
                   median(published[1]) * 1000, "ms",
                   note="DNAT rules in one iptables-restore, a proxy socket per port"))
    report.add(Row(SECTION_MEM, "plugin RSS idle vs bare python with its imports", idle, floor,
                   "MiB"))
    report.add(Row(SECTION_MEM, f"plugin RSS with {endpoints} endpoints vs idle",
                   data["rss_endpoints_mib"], idle, "MiB"))
