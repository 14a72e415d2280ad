"""Does the plugin's state match the kernel and Docker? One check, used after
crashes, restarts and load: it compares three views of one lab host.

    state   the plugin's state.json
    docker  fan networks, their running endpoints and addresses (docker network inspect)
    kernel  interfaces carrying our mark, bridge ports, routes through the fan's
            tunnel devices, eBPF filters on them and on the underlay devices'
            ingress, iptables rules with our comment: as `fan-driver check` reads
            them (fan_driver/check/kernel.py), run in the lab host

The kernel against the state is `fan-driver check`'s own comparison
(fan_driver/check/drift.py); this adds Docker's view and the state's
bookkeeping. check() raises AssertionError naming every mismatch and returns
counts.
"""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from ipaddress import IPv4Interface
from pathlib import Path

from fan_driver.check.drift import differences
from fan_driver.check.kernel import KernelView
from fan_driver.cli import peer_mappings
from fan_driver.dataplane.firewall import network_rules
from fan_driver.lookup import plan_for
from fan_driver.model import Owner, State

from .plugin import plugin_env


def read_state(state_dir: Path) -> dict:
    path = Path(state_dir) / "state.json"
    if not path.exists():
        return {"pools": {}, "networks": {}}
    return json.loads(path.read_text())


def docker_view(dockerd, driver: str = "fan") -> dict:
    """{network id: {"name", "subnet", "endpoints": {endpoint id: ip}}} for fan
    networks (driver: the managed plugin's is its full name, fan:latest)."""
    ids = dockerd.cli("network", "ls", "-q", "--no-trunc", "--filter",
                      f"driver={driver}").stdout.split()
    view = {}
    if not ids:
        return view
    for net in json.loads(dockerd.cli("network", "inspect", *ids).stdout):
        endpoints = {c["EndpointID"]: str(IPv4Interface(c["IPv4Address"]).ip)
                     for c in (net.get("Containers") or {}).values()}
        view[net["Id"]] = {"name": net["Name"], "endpoints": endpoints,
                           "subnet": net["IPAM"]["Config"][0]["Subnet"]}
    return view


def kernel_snapshot(host, only_fan_rules: bool = False) -> dict:
    """Everything a fan network could leave behind, in a comparable form: link
    names, IPv4 routes (IPv6 link-local routes appear on their own, at any time),
    iptables rules (all, or only those that name the fan; not the tables'
    headers: dockerd 28 loads the raw table for a bridge network, and the
    empty table stays when that network goes) and the fan's filters on devices
    it does not own."""
    links = sorted(line.split(":")[1].strip().split("@")[0]
                   for line in host.run(["ip", "-o", "link"]).stdout.splitlines())
    routes = sorted(host.run(["ip", "-4", "route", "show", "table", "all"]).stdout.splitlines())
    rules = sorted(line for line in host.run(["iptables-save"]).stdout.splitlines()
                   if ("fan" in line.lower() if only_fan_rules
                       else line.startswith("-A ")))
    filters = sorted(f"{dev} pref {pref}" for dev, pref in kernel_view(host)["decaps"])
    return {"links": links, "routes": routes, "rules": rules, "filters": filters}


def kernel_view(host) -> dict:
    """The fan's objects in the host's kernel as `fan-driver check` reads them
    (fan_driver.check.kernel.KernelView, as JSON)."""
    return json.loads(host.run([sys.executable, "-m", "fan_driver", "check", "--kernel-json"],
                               env=plugin_env()).stdout)


def check(plugin, dockerd, host, allow_unclaimed: bool = False, driver: str = "fan") -> dict:
    """Assert that state, Docker and kernel agree; return counts of what is there.
    The kernel against the state is `fan-driver check`'s comparison; here, in
    addition, Docker against the state and the state's own bookkeeping.
    allow_unclaimed: addresses and pools marked "unclaimed" at a restart may
    still wait for their grace period to end."""
    state, docker = read_state(plugin.state_dir), docker_view(dockerd, driver)
    kernel = KernelView.from_json(kernel_view(host))
    problems = [f"{d.what} (fix: {d.fix})"
                for d in differences(State.from_json(state), kernel, peer_mappings())]

    def expect(cond, what):
        if not cond:
            problems.append(what)

    nets, pools = state["networks"], state["pools"]
    expect(set(nets) == set(docker),
           f"fan networks: state {sorted(n[:12] for n in nets)} docker "
           f"{sorted(n[:12] for n in docker)}")
    all_ips = []
    for nid, net in nets.items():
        pool = pools.get(net["pool_id"])
        if pool is None:   # a difference above
            continue
        eps = {eid: str(IPv4Interface(ep["address"]).ip) for eid, ep in net["endpoints"].items()}
        all_ips += list(eps.values())
        if nid in docker:
            expect(eps == docker[nid]["endpoints"],
                   f"network {nid[:12]} endpoints: state {_short(eps)} docker "
                   f"{_short(docker[nid]['endpoints'])}")
        gateway = [ip for ip, owner in pool["addresses"].items() if owner == Owner.GATEWAY]
        expect(len(gateway) == 1, f"pool {net['pool_id']}: gateways {gateway}")
        held = {ip: owner for ip, owner in pool["addresses"].items() if owner != Owner.GATEWAY}
        extra = {ip: o for ip, o in held.items() if o not in eps or eps[o] != ip}
        if allow_unclaimed:
            extra = {ip: o for ip, o in extra.items() if o != Owner.UNCLAIMED}
        expect(not extra, f"pool {net['pool_id']}: addresses held by no endpoint: {extra}")
        expect(set(held) >= set(eps.values()),
               f"pool {net['pool_id']}: endpoint addresses not allocated: "
               f"{set(eps.values()) - set(held)}")
    if not allow_unclaimed:
        lonely = [pid for pid in pools if pid not in {n["pool_id"] for n in nets.values()}]
        expect(not lonely, f"pools without a network: {lonely}")
    dupes = [ip for ip, n in Counter(all_ips).items() if n > 1]
    docker_ips = [ip for n in docker.values() for ip in n["endpoints"].values()]
    dupes += [ip for ip, n in Counter(docker_ips).items() if n > 1]
    expect(not dupes, f"addresses held twice: {dupes}")
    assert not problems, "state, Docker and kernel disagree:\n  " + "\n  ".join(problems)
    return {"networks": len(nets), "endpoints": len(all_ips),
            "addresses": sum(len(p["addresses"]) for p in pools.values()),
            "interfaces": len(kernel.marked), "rules": len(kernel.rules)}


def network_rule_count(state: dict, network_id: str) -> int:
    return len(network_rules(plan_for(State.from_json(state), network_id), "tunnel"))


def _short(eps: dict) -> dict:
    return {eid[:12]: ip for eid, ip in sorted(eps.items())}


def settled(plugin, dockerd, host, allow_unclaimed=False, timeout=15, driver="fan") -> dict:
    """check(), retried for a moment: dockerd finishes its rollback
    calls (ReleaseAddress...) just after the CLI returns."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check(plugin, dockerd, host, allow_unclaimed=allow_unclaimed, driver=driver)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
