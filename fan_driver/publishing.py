"""Published ports (`docker run -p`): Docker leaves publishing to a network
driver whose Join gives a gateway, as the fan's does. The PortPublisher keeps
each endpoint's bindings in the state and has the dataplane program them; the
ports every other endpoint of the fan publishes are passed along, so a host
port is never given twice."""
from __future__ import annotations

import logging
from typing import Iterator, Tuple

from .dataplane import Dataplane
from .errors import FanError
from .faults import NO_FAULTS, Faults
from .ledger import Ledger
from .lookup import find_endpoint, plan_for
from .model import State, short_id
from .ports import PortBinding, held_index, runs
from .protocol import EndpointRef, ExternalConnectivity

log = logging.getLogger(__name__)


def published_ports(state: State, but: str = "") -> Iterator[Tuple[str, PortBinding]]:
    """(holder, binding) for every port the fan publishes, but endpoint `but`'s."""
    for nid, net in state.networks.items():
        for eid, endpoint in net.endpoints.items():
            if eid != but:
                yield from ((f"endpoint {short_id(eid)} of fan network {short_id(nid)}", b)
                            for b in endpoint.ports)


class PortPublisher:
    """ProgramExternalConnectivity and RevokeExternalConnectivity, for the NetworkDriver."""

    def __init__(self, ledger: Ledger, dataplane: Dataplane, faults: Faults = NO_FAULTS):
        self.ledger = ledger
        self.dataplane = dataplane
        self.faults = faults

    async def publish(self, request: ExternalConnectivity) -> None:
        """Publish the endpoint's ports. Any failure leaves no port taken and no rule."""
        network_id, endpoint_id = request.network_id, request.endpoint_id
        publication = request.publication
        async with self.ledger.change() as state:
            endpoint = find_endpoint(state, network_id, endpoint_id)
            plan = plan_for(state, network_id)
            if plan.internal and publication.requests:
                raise FanError(f"fan network {short_id(network_id)} is internal: it publishes "
                               "no ports; drop -p/-P or use a network without --internal")
            if endpoint.ports:    # programmed again (Docker 29: the gateway moved back)
                await self.dataplane.unpublish(plan, endpoint_id, endpoint.ports)
                endpoint.ports = ()
                self.ledger.commit()
            if not publication.requests:
                return
            endpoint.ports = await self.dataplane.publish(
                plan, endpoint_id, endpoint.ip, publication.requests,
                held_index(published_ports(state, but=endpoint_id)))
            self.faults.check("program_external_connectivity:after_kernel")
        log.info("endpoint %s publishes %s", short_id(endpoint_id),
                 ", ".join(b.describe() + (f" (+{n - 1})" if n > 1 else "")
                           for b, n in runs(endpoint.ports)))

    async def revoke(self, request: EndpointRef) -> None:
        """The endpoint's published ports go; nothing to do for one that has none."""
        network_id, endpoint_id = request.network_id, request.endpoint_id
        async with self.ledger.change() as state:
            net = state.networks.get(network_id)
            endpoint = net.endpoints.get(endpoint_id) if net is not None else None
            if endpoint is None or not endpoint.ports:
                return
            bindings, endpoint.ports = endpoint.ports, ()
            self.ledger.commit()    # a crash from here leaves orphan rules, swept at start
            self.faults.check("revoke_external_connectivity:after_state")
            await self.dataplane.unpublish(plan_for(state, network_id), endpoint_id, bindings)
        log.info("endpoint %s publishes no ports any more", short_id(endpoint_id))
