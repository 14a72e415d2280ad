"""Published ports on this host: the host ports an endpoint takes (held by the
userland proxy's sockets) and its DNAT rules, programmed in one batch."""
from __future__ import annotations

import logging
from ipaddress import IPv4Address
from pathlib import Path
from typing import List, Sequence, Tuple

from ..errors import FanError
from ..model import short_id
from ..ports import Held, PortBinding, PortRequest, first_conflict, parse_port_range
from .base import Firewall
from .dnat import ForeignDnat, first_taker
from .plan import NetworkPlan
from .proxy import PortTaken, UserlandProxy

log = logging.getLogger(__name__)
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")

class Publisher:
    def __init__(self, firewall: Firewall, proxy: UserlandProxy):
        self.firewall = firewall
        self.proxy = proxy

    async def publish(self, plan: NetworkPlan, endpoint_id: str, container: IPv4Address,
                      requests: Sequence[PortRequest], held: Held) -> Tuple[PortBinding, ...]:
        """Take a host port for each request, then program the rules; on any
        failure nothing of it is left."""
        bindings: List[PortBinding] = []
        ephemeral = parse_port_range(_read(EPHEMERAL_RANGE))
        foreign = await self.firewall.foreign_dnat()
        try:
            for request in requests:
                binding = await self._take(request, container, held, foreign, ephemeral)
                bindings.append(binding)
                held.setdefault((binding.proto, binding.host_port), []).append(
                    (f"this container ({request.describe()})", binding))
            await self.firewall.ensure_ports(plan, endpoint_id, container, bindings)
        except BaseException:
            for binding in bindings:
                self.proxy.close(binding)
            await self.firewall.remove_ports(plan, endpoint_id)
            raise
        return tuple(bindings)

    async def _take(self, request: PortRequest, container: IPv4Address, held: Held,
                    foreign: Sequence[ForeignDnat], ephemeral: Tuple[int, int]) -> PortBinding:
        candidates = request.candidates(ephemeral)
        for port in candidates:
            binding = PortBinding(request.proto, request.host_ip, port, request.port)
            holder = first_conflict(binding, held.get((binding.proto, port), ()))
            try:
                if holder is not None:
                    raise PortTaken(f"host port {port}/{binding.proto} is already published "
                                    f"by {holder}")
                await self._open(binding, container, foreign)
                return binding
            except PortTaken as exc:
                if len(candidates) == 1:
                    raise PortTaken(f"cannot publish {request.describe()}: {exc}; publish "
                                    "another host port, or stop what holds it") from None
        raise PortTaken(f"cannot publish {request.describe()}: every host port from "
                        f"{candidates.start} to {candidates.stop - 1} is in use")

    async def restore(self, plan: NetworkPlan, endpoint_id: str, container: IPv4Address,
                      bindings: Sequence[PortBinding]) -> None:
        """After a restart or a reboot: the proxy's sockets and the rules again,
        but for a port another process or another DNAT rule took meanwhile:
        its binding stays in the state, without a rule (DNAT would take the
        traffic from its new holder), and comes back at a restore once free."""
        foreign = await self.firewall.foreign_dnat()
        programmed = []
        for binding in bindings:
            try:
                await self._open(binding, container, foreign)
            except PortTaken as exc:
                log.error("endpoint %s: %s not restored: %s; free the port, then restart "
                          "fan-driver or the container", short_id(endpoint_id),
                          binding.describe(), exc)
                continue
            except FanError as exc:   # the rules still serve other machines
                log.error("endpoint %s: %s", short_id(endpoint_id), exc)
            programmed.append(binding)
        await self.firewall.ensure_ports(plan, endpoint_id, container, programmed)

    async def _open(self, binding: PortBinding, container: IPv4Address,
                    foreign: Sequence[ForeignDnat]) -> None:
        """Take the binding's host port: its socket first (PortTaken names the
        process holding it), then refuse it if another DNAT rule forwards it."""
        await self.proxy.open(binding, container)
        rule = first_taker(binding, foreign)
        if rule is not None:
            self.proxy.close(binding)
            raise PortTaken(f"host port {binding.host_port}/{binding.proto} is already "
                            f"forwarded by a DNAT rule that is not fan-driver's "
                            f"({rule.describe()})")

    async def unpublish(self, plan: NetworkPlan, endpoint_id: str,
                        bindings: Sequence[PortBinding]) -> None:
        await self.firewall.remove_ports(plan, endpoint_id)
        for binding in bindings:
            self.proxy.close(binding)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
