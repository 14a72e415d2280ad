"""One network read out of the state, as the network driver's parts need it:
the network or endpoint a request names (NotFound, naming the ID, when this
plugin holds none) and the plan the dataplane works from. Shared by the
NetworkDriver, the PortPublisher and the Reconciler, which import nothing of
each other's."""
from __future__ import annotations

from .dataplane.encap import encap_named
from .dataplane.plan import NetworkPlan
from .errors import NotFound
from .model import Endpoint, Network, State, short_id


def plan_for(state: State, network_id: str) -> NetworkPlan:
    net = state.networks[network_id]
    pool = state.pools[net.pool_id]
    return NetworkPlan(network_id=network_id, host=pool.host_slice,
                       underlay_interface=pool.interface, mtu=net.mtu,
                       encap=encap_named(net.encap), mapping=net.mapping, tc_pref=net.tc_pref,
                       internal=net.internal, receive=net.receive, vxlan_port=net.vxlan_port)


def find_network(state: State, network_id: str) -> Network:
    try:
        return state.networks[network_id]
    except KeyError:
        raise NotFound(f"no fan network {short_id(str(network_id))}") from None


def find_endpoint(state: State, network_id: str, endpoint_id: str) -> Endpoint:
    try:
        return find_network(state, network_id).endpoints[endpoint_id]
    except KeyError:
        raise NotFound(f"no endpoint {short_id(str(endpoint_id))} on fan network "
                       f"{short_id(network_id)}") from None
