"""Does the plugin's state match the kernel and Docker? One check, used after
crashes, restarts and load: it compares three views of one lab host.

    state   the plugin's state.json
    docker  fan networks, their running endpoints and addresses (docker network inspect)
    kernel  interfaces carrying our mark, bridge ports, routes through the fan's
            tunnel devices, eBPF filters on them and on the underlay devices'
            ingress, iptables rules with our comment

check() raises AssertionError naming every mismatch and returns counts.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from fan_driver.fanmap import FanMap, HostSlice
from fan_driver.dataplane.firewall import network_rules
from fan_driver.dataplane.encap import ENCAPS
from fan_driver.dataplane.mapping.ebpf import DECAP_PREF, PROGRAM_PREFIX, EbpfMapping
from fan_driver.dataplane.mapping.routes import RoutesMapping
from fan_driver.dataplane.plan import MARK
from fan_driver.lookup import plan_for
from fan_driver.model import Owner, State



def shared_tunnel(name: str) -> bool:
    """An external-mode device networks share: one per encapsulation, and for
    VXLAN one per UDP port in use (fan-vxlan, fan-vxlan-4790)."""
    return any(encap.is_external_device(name) for encap in ENCAPS.values())


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
    filters = sorted({f"{dev} pref {pref}" for (_, pref), dev in receive_filters(host).items()})
    return {"links": links, "routes": routes, "rules": rules, "filters": filters}


def receive_filters(host) -> dict:
    """The receive shortcuts' filters, ours on any addressed device's ingress:
    {(an address of the device, pref): device}."""
    found = {}
    for link in json.loads(host.run(["ip", "-4", "-j", "addr", "show"]).stdout):
        out = host.run(["tc", "-j", "filter", "show", "dev", link["ifname"], "ingress"]).stdout
        prefs = {f["pref"] for f in json.loads(out or "[]") if f.get("kind") == "bpf"
                 and str(f.get("options", {}).get("bpf_name", "")).startswith(PROGRAM_PREFIX)
                 and f["pref"] >= DECAP_PREF}
        for info in link.get("addr_info", ()):
            found.update({(info["local"], pref): link["ifname"] for pref in prefs})
    return found


def kernel_view(host) -> dict:
    links = json.loads(host.run(["ip", "-j", "-d", "link", "show"]).stdout)
    marked = {link["ifname"]: link.get("ifalias", "") for link in links
              if link.get("ifalias") == MARK or str(link.get("ifalias", "")).startswith(MARK + " ")}
    ports = {}
    for link in links:
        if "master" in link:
            ports.setdefault(link["master"], set()).add(link["ifname"])
    routes = {}
    for route in json.loads(host.run(["ip", "-4", "-j", "route", "show", "table", "all"]).stdout):
        dev = route.get("dev", "")
        if dev.startswith("fan"):
            routes.setdefault(dev, []).append(route["dst"])
    filters = {}
    for dev in marked:
        if shared_tunnel(dev):
            out = host.run(["tc", "-j", "filter", "show", "dev", dev, "egress"]).stdout
            filters[dev] = sorted({f["pref"] for f in json.loads(out or "[]") if f.get("kind") == "bpf"
                                   and "options" in f})
    saved = host.run(["iptables-save"]).stdout.splitlines()
    rules = [line for line in saved if f'--comment "{MARK} ' in line]
    chains = [line for line in saved if line.startswith(":FAN-") or "-j FAN-" in line]
    named = [link["ifname"] for link in links if link["ifname"].startswith(("fve", "fvc"))]
    return {"marked": marked, "ports": ports, "routes": routes, "filters": filters,
            "decaps": receive_filters(host), "rules": rules, "chains": chains, "fv_links": named}


def check(plugin, dockerd, host, allow_unclaimed: bool = False, driver: str = "fan") -> dict:
    """Assert that state, Docker and kernel agree; return counts of what is there.
    allow_unclaimed: addresses and pools marked "unclaimed" at a restart may
    still wait for their grace period to end."""
    state, docker, kernel = (read_state(plugin.state_dir), docker_view(dockerd, driver),
                             kernel_view(host))
    problems = []

    def expect(cond, what):
        if not cond:
            problems.append(what)

    nets, pools = state["networks"], state["pools"]
    expect(set(nets) == set(docker),
           f"fan networks: state {sorted(n[:12] for n in nets)} docker "
           f"{sorted(n[:12] for n in docker)}")
    wanted_links, all_ips, wanted_rules = set(), [], 0
    for nid, net in nets.items():
        pool = pools.get(net["pool_id"])
        expect(pool is not None, f"network {nid[:12]}: pool {net['pool_id']} missing")
        if pool is None:
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
        # the bridge and its ports
        overlay = net["pool_id"].split(":", 1)[1]
        bridge = HostSlice(FanMap(IPv4Network(overlay), IPv4Network(pool["underlay"])),
                           IPv4Address(pool["underlay_address"])).bridge_name
        wanted_links.add(bridge)
        veths = {"fve" + eid[:12] for eid in eps}
        wanted_links |= veths
        expect(bridge in kernel["marked"], f"bridge {bridge} missing or unmarked")
        expect(kernel["ports"].get(bridge, set()) == veths,
               f"bridge {bridge} ports {sorted(kernel['ports'].get(bridge, set()))} "
               f"!= endpoints {sorted(veths)}")
        wanted = network_rule_count(state, nid)
        wanted_rules += wanted + sum(port_rule_count(ep) for ep in net["endpoints"].values())
        expect(sum(1 for r in kernel["rules"] if f'"{MARK} {nid[:12]}"' in r) == wanted,
               f"network {nid[:12]}: rules {[r for r in kernel['rules'] if nid[:12] in r]}")
        for eid, ep in net["endpoints"].items():
            found = sum(1 for r in kernel["rules"] if f'"{MARK} {nid[:12]} {eid[:12]}"' in r)
            expect(found == port_rule_count(ep),
                   f"endpoint {eid[:12]}: {found} port rules for {ep.get('ports', [])}")
    if not allow_unclaimed:
        lonely = [pid for pid in pools if pid not in {n["pool_id"] for n in nets.values()}]
        expect(not lonely, f"pools without a network: {lonely}")
    dupes = [ip for ip, n in Counter(all_ips).items() if n > 1]
    docker_ips = [ip for n in docker.values() for ip in n["endpoints"].values()]
    dupes += [ip for ip, n in Counter(docker_ips).items() if n > 1]
    expect(not dupes, f"addresses held twice: {dupes}")
    # tunnels: per-peer routes networks have a device of their own (its
    # routes, one per peer, are programmed in the background); the others
    # share one device per encapsulation in use, one route and one filter per
    # network on it (VXLAN: one device per UDP port in use)
    loaded = State.from_json(state)
    per_peer = {nid for nid, n in nets.items() if n["mapping"] == "routes"}
    wanted_links |= {RoutesMapping().tunnel_device(plan_for(loaded, nid)) for nid in per_peer}
    shared = {nid: n for nid, n in nets.items() if nid not in per_peer}
    device_of = {nid: EbpfMapping().tunnel_device(plan_for(loaded, nid)) for nid in shared}
    tunnels = {name for name in kernel["marked"] if shared_tunnel(name)}
    wanted_links |= tunnels
    expect(tunnels == set(device_of.values()),
           f"tunnel devices {sorted(tunnels)} for networks on {sorted(set(device_of.values()))}")
    overlays = sorted((device_of[nid], n["pool_id"].split(":", 1)[1]) for nid, n in shared.items())
    routed = sorted((dev, dst) for dev in tunnels for dst in kernel["routes"].get(dev, []))
    expect(routed == overlays, f"overlay routes {routed} != {overlays}")
    prefs = sorted(n["tc_pref"] for n in shared.values())
    filtered = sorted(p for dev in tunnels for p in kernel["filters"].get(dev, []))
    expect(filtered == prefs, f"eBPF filter prefs {filtered} != {prefs}")
    # one receive shortcut per VXLAN network with the eBPF mapping that receives
    # straight from the underlay, on its underlay device
    decaps = sorted((pools[n["pool_id"]]["underlay_address"], DECAP_PREF + n["tc_pref"])
                    for n in nets.values() if n["pool_id"] in pools
                    and (n["encap"], n["mapping"]) == ("vxlan", "ebpf")
                    and n.get("receive", "tunnel") != "tunnel")
    expect(sorted(kernel["decaps"]) == decaps,
           f"receive filters on underlay devices {sorted(kernel['decaps'].items())} != {decaps}")
    stray_routes = {dev: r for dev, r in kernel["routes"].items()
                    if dev not in tunnels and dev not in wanted_links}
    expect(not stray_routes, f"routes through devices no network owns: {stray_routes}")
    expect(set(kernel["marked"]) == wanted_links,
           f"marked interfaces: orphans {sorted(set(kernel['marked']) - wanted_links)}, "
           f"missing {sorted(wanted_links - set(kernel['marked']))}")
    expect(set(kernel["fv_links"]) <= wanted_links,
           f"endpoint interfaces left in the host: {sorted(set(kernel['fv_links']) - wanted_links)}")
    expect(len(kernel["rules"]) == wanted_rules, f"{len(kernel['rules'])} marked rules for "
           f"{len(nets)} networks, {wanted_rules} wanted: {kernel['rules']}")
    if not nets:
        expect(not kernel["chains"], f"our chains left: {kernel['chains']}")
    assert not problems, "state, Docker and kernel disagree:\n  " + "\n  ".join(problems)
    return {"networks": len(nets), "endpoints": len(all_ips),
            "addresses": sum(len(p["addresses"]) for p in pools.values()),
            "interfaces": len(kernel["marked"]), "rules": len(kernel["rules"])}


def network_rule_count(state: dict, network_id: str) -> int:
    return len(network_rules(plan_for(State.from_json(state), network_id), "tunnel"))


def port_rule_count(endpoint: dict) -> int:
    """A DNAT per published port not on loopback, and then one ACCEPT and one
    hairpin MASQUERADE for the endpoint (fan_driver.dataplane.firewall.port_rules)."""
    dnat = sum(1 for b in endpoint.get("ports", ()) if not IPv4Address(b["host_ip"]).is_loopback)
    return dnat + 2 if dnat else 0


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
