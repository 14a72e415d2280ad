"""Peers found by an eBPF program: the Fan's constant per-host state on stock kernels.

One external-mode (collect_md) tunnel device per encapsulation is shared by
every fan network on the host; each network adds one route for its overlay and
one tc filter that computes a packet's outer destination from its inner one.
No per-peer routes, neighbour or FDB entries exist.

The VXLAN device is NOARP and has the same MAC on every host: with NOARP the
kernel uses the device's own MAC as the next hop's, and since every host's
device has that MAC the receiving device takes the frame as addressed to it.
(The program flips a bit of the inner source MAC, because VXLAN drops frames
whose source is its own MAC as loops.) Learning is off: no FDB entries appear.
"""
from __future__ import annotations

import logging
from ipaddress import IPv4Network

from ..errors import FanError
from ..fanmap import FanMap
from . import bpf
from .netlink import Links
from .plan import ENCAPS, MARK, VXLAN_PORT, NetworkPlan

SHARED_VXLAN_MAC = "0e:fa:00:00:00:01"
PROGRAM_PREFIX = "fan_"
log = logging.getLogger(__name__)


def supported() -> bool:
    """Whether this kernel's verifier takes the fan program (loaded, then dropped)."""
    sample = FanMap(IPv4Network("250.0.0.0/8"), IPv4Network("172.30.0.0/16"))
    try:
        bpf.close(bpf.load_program(bpf.fan_program(sample, 1, 14), "fan_probe"))
    except (FanError, OSError) as exc:
        log.info("eBPF tunnel mapping unavailable: %s", exc)
        return False
    return True


class EbpfMapping:
    name = "ebpf"

    async def ensure(self, links: Links, plan: NetworkPlan) -> None:
        index = await self._ensure_device(links, plan)
        attached = await bpf.egress_filters(links.ipr, index)
        if attached.get(plan.tc_pref) != self._program_name(plan):
            fd = bpf.load_program(
                bpf.fan_program(plan.host.fan, plan.vni, plan.encap.inner_ip_offset),
                self._program_name(plan))
            try:
                await bpf.attach_egress(links.ipr, index, fd, self._program_name(plan), plan.tc_pref)
            finally:
                bpf.close(fd)
        await links.ensure_route(plan.overlay, index, metrics={"mtu": plan.mtu})

    async def remove(self, links: Links, plan: NetworkPlan) -> None:
        index = await links.index(plan.encap.device)
        if index is None:
            return
        await links.remove_route(plan.overlay, index)
        await bpf.detach_egress(links.ipr, index, plan.tc_pref)
        if not await bpf.egress_filters(links.ipr, index):
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
            for pref, name in (await bpf.egress_filters(links.ipr, index)).items():
                if pref not in prefs and name.startswith(PROGRAM_PREFIX):
                    log.warning("removing orphan eBPF filter %s (pref %d) on %s",
                                name, pref, encap.device)
                    await bpf.detach_egress(links.ipr, index, pref)
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
