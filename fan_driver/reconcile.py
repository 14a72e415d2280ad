"""After a restart or a reboot, before the plugin serves: the Reconciler makes
the kernel match the state, both ways (removes what no state accounts for,
makes again what the state holds), and releases, after a grace period, what
was handed out and not yet used when the plugin stopped: a reply lost in a
crash is one Docker never saw, and would otherwise hold its pool or address
for good."""
from __future__ import annotations

import asyncio
import logging
from typing import Dict, List, Optional

from .dataplane import Dataplane
from .dataplane.plan import NetworkPlan
from .errors import FanError
from .faults import NO_FAULTS, Faults
from .ledger import Ledger
from .lookup import plan_for
from .model import Endpoint, Owner, State, short_id

log = logging.getLogger(__name__)

# Docker retries a call for 30 s; after a restart, whatever was in flight at
# the crash is claimed or released by Docker well within this time.
UNCLAIMED_GRACE = 30.0


class Reconciler:
    def __init__(self, ledger: Ledger, dataplane: Dataplane, faults: Faults = NO_FAULTS,
                 grace: float = UNCLAIMED_GRACE):
        self.ledger = ledger
        self.dataplane = dataplane
        self.faults = faults
        self.grace = grace
        self._sweep: Optional[asyncio.Task] = None   # the delayed release, once started

    async def restore(self) -> None:
        """Run once at start; the delayed release goes on in the background."""
        async with self.ledger.change() as state:
            unclaimed = _mark_unclaimed(state)
            plans = [plan_for(state, nid) for nid in state.networks]
            await self._remove_orphans(state, plans)
            for plan in plans:
                await self._restore_network(plan, state.networks[plan.network_id].endpoints)
        if unclaimed:
            log.warning("%s handed out before the restart and not in use yet: released in "
                        "%.0f s unless Docker uses them", ", ".join(unclaimed), self.grace)
            self._sweep = asyncio.get_running_loop().create_task(self._release_unclaimed())

    async def _remove_orphans(self, state: State, plans: List[NetworkPlan]) -> None:
        endpoints = {eid for net in state.networks.values() for eid in net.endpoints}
        published = {eid for net in state.networks.values()
                     for eid, ep in net.endpoints.items() if ep.ports}
        await self.dataplane.remove_orphans(plans, endpoints, published)
        self.faults.check("restore:after_orphans")

    async def _restore_network(self, plan: NetworkPlan, endpoints: Dict[str, Endpoint]) -> None:
        try:
            await self.dataplane.ensure_network(plan, undo_on_failure=False)
            await self.dataplane.reattach(plan, endpoints)
            for endpoint_id, endpoint in endpoints.items():
                if endpoint.ports:
                    await self.dataplane.restore_ports(plan, endpoint_id, endpoint.ip,
                                                       endpoint.ports)
        except FanError as exc:   # serve the others; requests on it will say so
            log.error("network %s cannot be restored: %s", short_id(plan.network_id), exc)
            return
        self.faults.check("restore:after_network")
        log.info("network %s restored: bridge %s", short_id(plan.network_id), plan.bridge)

    async def _release_unclaimed(self) -> None:
        await asyncio.sleep(self.grace)
        async with self.ledger.change() as state:
            for pid, pool in list(state.pools.items()):
                if pool.unclaimed and state.network_of_pool(pid) is None:
                    del state.pools[pid]
                    log.warning("released pool %s: no network used it", pid)
                    continue
                for ip, owner in list(pool.addresses.items()):
                    if owner == Owner.UNCLAIMED:
                        del pool.addresses[ip]
                        log.warning("released address %s: no endpoint used it", ip)


def _mark_unclaimed(state: State) -> list:
    """Mark pools without a network and addresses without an endpoint; say which."""
    marked = []
    for pid, pool in state.pools.items():
        if state.network_of_pool(pid) is None:
            pool.unclaimed = True
            marked.append(f"pool {pid}")
        for ip, owner in pool.addresses.items():
            if owner in (Owner.PENDING, Owner.UNCLAIMED):
                pool.addresses[ip] = Owner.UNCLAIMED
                marked.append(f"address {ip}")
    return marked
