"""Scale: how long a fan network takes to become usable, and how much kernel state
it leaves on a host, as the underlay grows from /24 to /16, for each mapping.

The baseline is a Docker bridge network made by the same dockerd. "Usable"
means every peer reachable: for mapping=ebpf when `docker network create`
returns; for mapping=routes, which programs peers in the background, when the
kernel holds the last peer's route (peers are programmed in address order,
each as neighbour, FDB entry, nexthop object, then route), polled with
`ip route get`.
Kernel objects are counted in the host's namespace before and after.
"""
from __future__ import annotations

import re
import time

from tests.harness.procs import run_cmd

from tests.harness.fanhosts import FanHost

from .lab import KERNEL_FAN, BenchLab, count_lines, peers_of, wait_programmed
from .results import Report, Row, error_row, median

SECTION = "scale"
OVERLAY = "250.0.0.0/8"
UNDERLAYS = ("172.30.0.0/24", "172.30.0.0/20", "172.30.0.0/16")
MAPPINGS = ("ebpf", "routes", "kernel")
NET = "bench-scale"
BRIDGE_SUBNET = "10.99.0.0/24"


def kernel_objects(h: FanHost) -> dict:
    """Netlink objects and firewall rules in the host's namespace, by kind."""
    ns = h.host.name
    links = run_cmd(["ip", "-n", ns, "-o", "link", "show"]).stdout.splitlines()
    names = [line.split(":")[1].strip().split("@")[0] for line in links]
    tc = 0
    for name in names:
        if name.startswith("fan"):
            for hook in ("ingress", "egress"):
                out = run_cmd(["tc", "-n", ns, "filter", "show", "dev", name, hook],
                              check=False).stdout
                tc += sum(1 for line in out.splitlines() if " handle " in line)
    rules = 0
    for table in ("filter", "nat"):
        out = h.host.run(["iptables", "-w", "-t", table, "-S"]).stdout
        rules += sum(1 for line in out.splitlines() if line.startswith(("-A", "-N")))
    return {
        "links": len(links),
        "routes": count_lines(["ip", "-n", ns, "-4", "route", "show", "table", "all"]),
        "permanent neighbours": count_lines(["ip", "-n", ns, "neigh", "show", "nud",
                                             "permanent"]),
        "fdb entries": count_lines(["bridge", "-n", ns, "fdb", "show"]),
        "nexthop objects": count_lines(["ip", "-n", ns, "nexthop", "show"]),
        "tc filters": tc,
        "firewall rules": rules,
    }


def delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


PROGRAMMED = re.compile(r"network (\w+): (\d+) peers programmed in ([0-9.]+) s")


def plugin_reported(h: FanHost, peers: int, network: str) -> float | None:
    """The plugin's own figure for programming the peers of `network` (its ID),
    logged just after the last peer is in the kernel."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in h.plugin.log_path.read_text(errors="replace").splitlines():
            m = PROGRAMMED.search(line)
            if m and int(m.group(2)) == peers and network.startswith(m.group(1)):
                return float(m.group(3))
        time.sleep(0.1)
    return None


def one_network(h: FanHost, args: list, wait=None) -> dict:
    """Create, wait until usable, count, remove: the figures of one network."""
    before = kernel_objects(h)
    started = time.monotonic()
    network_id = h.cli("network", "create", *args, NET, timeout=300).stdout.strip()
    try:
        created = time.monotonic() - started
        if wait is not None:
            wait()
        ready = time.monotonic() - started
        objects = delta(before, kernel_objects(h))
    except BaseException:
        h.cli("network", "rm", NET, timeout=600, check=False)
        raise
    started = time.monotonic()
    h.cli("network", "rm", NET, timeout=600)
    removed = time.monotonic() - started
    return {"create_s": created, "ready_s": ready, "remove_s": removed, "objects": objects,
            "total": sum(objects.values()), "id": network_id}


def measure_bridge(h: FanHost, repeats: int) -> dict:
    runs = [one_network(h, ["-d", "bridge", "--subnet", BRIDGE_SUBNET]) for _ in range(repeats)]
    return {**runs[-1], "ready_s": median(r["ready_s"] for r in runs),
            "create_s": median(r["create_s"] for r in runs), "repeats": repeats}


def measure_fan(h: FanHost, mapping: str, underlay: str, repeats: int) -> dict:
    args = ["-d", "fan", "--ipam-driver", "fan", "--subnet", OVERLAY,
            "--ipam-opt", f"underlay={underlay}", "-o", "encap=vxlan", "-o", f"mapping={mapping}"]
    peers = peers_of(underlay)
    wait = ((lambda: wait_programmed(h, underlay, OVERLAY, timeout=1800))
            if mapping == "routes" else None)
    runs = []
    for _ in range(repeats):
        run = one_network(h, args, wait)
        if mapping == "routes":
            # logged when the programming ends, which the kernel has seen by then
            run["plugin_reported_s"] = plugin_reported(h, peers, run["id"])
        runs.append(run)
    reported = [r["plugin_reported_s"] for r in runs if r.get("plugin_reported_s") is not None]
    return {**runs[-1], "ready_s": median(r["ready_s"] for r in runs),
            "create_s": median(r["create_s"] for r in runs), "repeats": repeats,
            "peers": peers, "plugin_reported_s": median(reported) if reported else None,
            "ready_runs_s": [r["ready_s"] for r in runs]}


def available(mapping: str) -> str | None:
    """Why a mapping cannot be measured on this machine, or None."""
    if mapping == "kernel" and not KERNEL_FAN.exists():
        return ("mapping=kernel needs Ubuntu's Fan kernel patch "
                f"({KERNEL_FAN} is missing on this kernel)")
    return None


def breakdown(objects: dict) -> str:
    return ", ".join(f"{k} {v:+d}" for k, v in objects.items() if v)


def run(bl: BenchLab, report: Report, short: bool, log) -> None:
    h = bl.hosts["h28"]
    underlays = UNDERLAYS[:1] if short else UNDERLAYS
    bridge = measure_bridge(h, 1 if short else 3)
    raw = {"bridge": bridge, "fan": {}}
    report.raw["scale"] = raw
    report.add(Row(SECTION, "create: docker bridge network (the baseline)", bridge["ready_s"],
                   bridge["ready_s"], "s", note=f"kernel objects {breakdown(bridge['objects'])}"))
    for mapping in MAPPINGS:
        why = available(mapping)
        if why:
            report.add(Row(SECTION, f"fan {mapping}: every underlay", None, None,
                           unavailable=why))
            continue
        for underlay in underlays:
            prefix = underlay.split("/")[1]
            big = mapping == "routes" and prefix == "16"
            started = time.monotonic()
            try:
                fan = measure_fan(h, mapping, underlay, 1 if short or big else 3)
            except Exception as exc:   # report it, measure the others
                report.add(error_row(SECTION, f"fan {mapping} /{prefix}",
                                     f"{type(exc).__name__}: {exc}"))
                continue
            raw["fan"][f"{mapping} /{prefix}"] = fan
            log(f"scale {mapping} /{prefix}: usable after {fan['ready_s']:.2f} s, "
                f"{fan['total']} objects ({time.monotonic() - started:.0f} s)")
            note = f"{fan['peers']:,} peers; docker network create returned in " \
                   f"{fan['create_s']:.2f} s; network rm {fan['remove_s']:.2f} s"
            if fan.get("plugin_reported_s") is not None:
                note += f"; plugin logged programming in {fan['plugin_reported_s']:.1f} s"
            report.add(Row(SECTION, f"create until usable: fan {mapping} /{prefix} "
                                    "vs docker bridge", fan["ready_s"], bridge["ready_s"], "s",
                           note=note))
            report.add(Row(SECTION, f"kernel objects: fan {mapping} /{prefix} vs docker bridge",
                           fan["total"], bridge["total"], "objects",
                           note=breakdown(fan["objects"])))
        first, last = f"{mapping} /24", f"{mapping} /{underlays[-1].split('/')[1]}"
        if first != last and first in raw["fan"] and last in raw["fan"]:
            report.add(Row(SECTION, f"kernel objects: fan {last} vs {first}",
                           raw["fan"][last]["total"], raw["fan"][first]["total"], "objects",
                           target=("==", 1.0) if mapping == "ebpf" else None,
                           note="constant per-host state is the point of the eBPF mapping"
                           if mapping == "ebpf" else "per-peer state grows with the underlay"))
