"""Peers found by an eBPF program: the Fan's constant per-host state on stock kernels.

One external-mode (collect_md) tunnel device per encapsulation is shared by
every fan network on the host; each network adds one route for its overlay and
one tc filter that computes a packet's outer destination from its inner one
(and, on VXLAN, one at ingress: see below). No per-peer routes, neighbour or
FDB entries exist.

The VXLAN device is NOARP and has the same MAC on every host: with NOARP the
kernel uses the device's own MAC as the next hop's, and since every host's
device has that MAC the receiving device takes the frame as addressed to it.
(The program flips a bit of the inner source MAC, because VXLAN drops frames
whose source is its own MAC as loops.) Learning is off: no FDB entries appear.

Overlay traffic between hosts skips the hosts' IP forwarding: each container's
veth has a program that sends it straight to the tunnel, and on an L2 tunnel a
program per network at ingress hands it straight into the container, found in
a map of the network's endpoints (see bpf.py). So netfilter (FORWARD,
DOCKER-USER) does not see it; traffic to and from outside the overlay takes
the kernel's path and the fan's rules as before.

The map lives as long as the program that uses it; this process keeps an fd to
fill it. After a restart, ensure() makes a new map and program, and the
endpoints are added again as they are re-attached: an address the map does not
hold yet goes through the bridge, never nowhere.
"""
from __future__ import annotations

import logging
from ipaddress import IPv4Network

from ..errors import FanError
from ..fanmap import FanMap
from ..model import Endpoint
from . import bpf
from .base import PeerMapping
from .netlink import Links
from .plan import ENCAPS, MARK, VXLAN_PORT, NetworkPlan

SHARED_VXLAN_MAC = "0e:fa:00:00:00:01"
PROGRAM_PREFIX = "fan_"
SEND_PREF = 1   # the only filter on a container's veth
log = logging.getLogger(__name__)


def probe_error() -> str | None:
    """Why this kernel's verifier refuses the fan program or the shortcuts
    (each loaded, then dropped), or None."""
    sample = FanMap(IPv4Network("250.0.0.0/8"), IPv4Network("172.30.0.0/16"))
    slice_ = IPv4Network("250.0.28.0/24")
    try:
        endpoints = _endpoints_map(slice_, "fan_probe")
        try:
            for insns in (bpf.fan_program(sample, 1, bpf.ETH_LEN),
                          bpf.send_shortcut(sample, slice_, 1, SHARED_VXLAN_MAC),
                          bpf.receive_shortcut(slice_, 1, endpoints)):
                bpf.close(bpf.load_program(insns, "fan_probe"))
        finally:
            bpf.close(endpoints)
    except (FanError, OSError) as exc:
        return str(exc)
    return None


def _endpoints_map(slice_: IPv4Network, name: str) -> int:
    return bpf.create_hash_map(bpf.ENDPOINT_KEY.size, bpf.ENDPOINT_VALUE.size,
                               slice_.num_addresses, name)


def supported() -> bool:
    error = probe_error()
    if error:
        log.info("eBPF tunnel mapping unavailable: %s", error)
    return error is None


class EbpfMapping(PeerMapping):
    name = "ebpf"

    def __init__(self):
        self._endpoint_maps = {}   # network ID -> fd of its receive shortcut's map
        # network ID -> fd of its send shortcut, loaded once and attached to every
        # veth (the verifier's work is most of an attach), and its instructions
        self._send_programs, self._send_code = {}, {}

    async def ensure(self, links: Links, plan: NetworkPlan) -> None:
        index = await self._ensure_device(links, plan)
        name = self._program_name(plan)
        if (await bpf.filters(links.ipr, index)).get(plan.tc_pref) != name:
            await bpf.attach_program(
                links.ipr, index,
                bpf.fan_program(plan.host.fan, plan.vni, plan.encap.inner_ip_offset),
                name, plan.tc_pref, bpf.EGRESS)
        if plan.encap.inner_ip_offset >= bpf.ETH_LEN:
            # always new: the program holds the bridge's index, new after a
            # reboot, and a map this process has an fd of
            endpoints = _endpoints_map(plan.slice, name)
            try:
                await bpf.attach_program(
                    links.ipr, index,
                    bpf.receive_shortcut(plan.slice, await links.index(plan.bridge), endpoints),
                    name, plan.tc_pref, bpf.INGRESS)
            except BaseException:
                bpf.close(endpoints)
                raise
            self._forget(self._endpoint_maps, plan)
            self._endpoint_maps[plan.network_id] = endpoints
        await links.ensure_route(plan.overlay, index, metrics={"mtu": plan.mtu})

    async def attach_endpoint(self, links: Links, plan: NetworkPlan, veth_index: int,
                              endpoint: Endpoint) -> None:
        """The send shortcut on a container's veth (again after a restore: it holds
        the tunnel's index), and the container in the receive shortcut's map."""
        tunnel = await links.index(plan.encap.device)
        if tunnel is None:
            raise FanError(f"tunnel device {plan.encap.device} is missing; "
                           "restart fan-driver to restore it")
        mac = SHARED_VXLAN_MAC if plan.encap.inner_ip_offset >= bpf.ETH_LEN else None
        insns = bpf.send_shortcut(plan.host.fan, plan.slice, tunnel, mac)
        if self._send_code.get(plan.network_id) != insns:   # new, or a new tunnel
            self._forget(self._send_programs, plan)
            self._send_code.pop(plan.network_id, None)
            self._send_programs[plan.network_id] = bpf.load_program(insns,
                                                                    self._program_name(plan))
            self._send_code[plan.network_id] = insns
        await bpf.attach(links.ipr, veth_index, self._send_programs[plan.network_id],
                         self._program_name(plan), SEND_PREF, bpf.INGRESS)
        endpoints = self._endpoint_maps.get(plan.network_id)
        if endpoints is not None:
            bpf.map_update(endpoints, *bpf.endpoint_entry(int(endpoint.ip), veth_index,
                                                          endpoint.mac))

    def detach_endpoint(self, plan: NetworkPlan, endpoint: Endpoint) -> None:
        """Out of the map before its veth goes. A failure only costs drops: the
        veth's ifindex is never reused, so a stale entry cannot misdeliver."""
        endpoints = self._endpoint_maps.get(plan.network_id)
        if endpoints is None:
            return
        try:
            bpf.map_delete(endpoints, bpf.ENDPOINT_KEY.pack(int(endpoint.ip)))
        except FanError as exc:
            log.warning("endpoint %s stays in the receive map: %s", endpoint.address, exc)

    @staticmethod
    def _forget(fds: dict, plan: NetworkPlan) -> None:
        fd = fds.pop(plan.network_id, None)
        if fd is not None:
            bpf.close(fd)

    async def remove(self, links: Links, plan: NetworkPlan) -> None:
        self._forget(self._endpoint_maps, plan)
        self._forget(self._send_programs, plan)
        self._send_code.pop(plan.network_id, None)
        index = await links.index(plan.encap.device)
        if index is None:
            return
        await links.remove_route(plan.overlay, index)
        await bpf.detach(links.ipr, index, plan.tc_pref, bpf.INGRESS)
        await bpf.detach(links.ipr, index, plan.tc_pref, bpf.EGRESS)
        if not await bpf.filters(links.ipr, index):
            await links.delete(plan.encap.device)

    def tunnel_device(self, plan: NetworkPlan) -> str:
        return plan.encap.device

    async def remove_orphans(self, links: Links, plans) -> None:
        """On each shared device, the filters and overlay routes of networks that
        `plans` (this mapping's networks in the state) do not account for: left
        by a crash between the kernel work and the state write."""
        for encap in ENCAPS.values():
            index = await links.index(encap.device)
            if index is None:
                continue
            ours = [p for p in plans if p.encap.name == encap.name]
            prefs = {p.tc_pref for p in ours}
            for parent in (bpf.INGRESS, bpf.EGRESS):
                for pref, name in (await bpf.filters(links.ipr, index, parent)).items():
                    if pref not in prefs and name.startswith(PROGRAM_PREFIX):
                        log.warning("removing orphan eBPF filter %s (pref %d) on %s",
                                    name, pref, encap.device)
                        await bpf.detach(links.ipr, index, pref, parent)
            overlays = {p.overlay for p in ours}
            for dst in await links.routes_on(index):
                if dst not in overlays:
                    log.warning("removing orphan route %s on %s", dst, encap.device)
                    await links.remove_route(dst, index)

    @staticmethod
    def _program_name(plan: NetworkPlan) -> str:
        return f"{PROGRAM_PREFIX}{plan.network_id[:8]}"

    async def _ensure_device(self, links: Links, plan: NetworkPlan) -> int:
        if plan.encap.name == "vxlan":
            spec = dict(vxlan_collect_metadata=1, vxlan_learning=0, vxlan_port=VXLAN_PORT,
                        address=SHARED_VXLAN_MAC)
        else:
            spec = dict(ipip_collect_metadata=True)
        index = await links.claim(plan.encap.device, plan.encap.name, MARK, mtu=plan.mtu, **spec)
        mtu = max(plan.mtu, await links.mtu(index))
        await links.set_up(index, mtu=mtu, arp=False)
        return index
