"""The Fan's address arithmetic: worked examples and properties."""
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fan_driver.errors import FanError
from fan_driver.fanmap import IFNAME_MAX, UNUSABLE, FanMap, HostSlice, bridge_name


def fan(overlay: str, underlay: str) -> FanMap:
    return FanMap(IPv4Network(overlay), IPv4Network(underlay))



def underlay_for(fan_map: FanMap, overlay_addr: IPv4Address) -> IPv4Address:
    """The underlay host that owns overlay_addr (the fan rule the eBPF programs
    apply to a packet's destination), computed apart from slice_for."""
    if overlay_addr not in fan_map.overlay:
        raise FanError(f"{overlay_addr} is not in overlay {fan_map.overlay}")
    host = (int(overlay_addr) & int(fan_map.overlay.hostmask)) >> fan_map.shift
    return IPv4Address(int(fan_map.underlay.network_address) | host)

# Worked examples, each checked by hand: overlay, underlay, host, slice, bridge.
WORKED_EXAMPLES = [
    ("250.0.0.0/8", "172.30.0.0/16", "172.30.0.28", "250.0.28.0/24", "fan-250-0-28"),
    ("250.0.0.0/8", "172.30.0.0/16", "172.30.5.9", "250.5.9.0/24", "fan-250-5-9"),
    ("250.0.0.0/8", "172.30.0.0/24", "172.30.0.28", "250.28.0.0/16", "fan-250-28"),
    ("10.100.0.0/16", "192.168.1.0/24", "192.168.1.28", "10.100.28.0/24", "fan-10-100-28"),
    ("99.0.0.0/8", "10.99.224.0/20", "10.99.238.5", "99.224.80.0/20", "fan-99-224-80"),
    ("100.64.0.0/10", "10.224.220.0/24", "10.224.220.10", "100.66.128.0/18", "fan-100-66-128"),
]


@pytest.mark.parametrize("overlay, underlay, host, expected_slice, expected_bridge",
                         WORKED_EXAMPLES)
def test_worked_example_slice_and_bridge(overlay, underlay, host, expected_slice,
                                         expected_bridge):
    host_slice = HostSlice(fan(overlay, underlay), IPv4Address(host))

    assert host_slice.slice == IPv4Network(expected_slice)
    assert host_slice.bridge_name == expected_bridge
    assert len(host_slice.bridge_name) <= IFNAME_MAX


@pytest.mark.parametrize("overlay, underlay, host, expected_slice, _bridge", WORKED_EXAMPLES)
def test_worked_example_reverse_mapping(overlay, underlay, host, expected_slice, _bridge):
    fan_map = fan(overlay, underlay)
    slice_ = IPv4Network(expected_slice)

    for address in (slice_.network_address, slice_.network_address + 1,
                    slice_.network_address + slice_.num_addresses // 2,
                    slice_.broadcast_address):
        assert underlay_for(fan_map, address) == IPv4Address(host)


@pytest.mark.parametrize("overlay, underlay, host, expected_slice, _bridge", WORKED_EXAMPLES)
def test_gateway_is_dot_one_of_the_slice(overlay, underlay, host, expected_slice, _bridge):
    host_slice = HostSlice(fan(overlay, underlay), IPv4Address(host))
    slice_ = IPv4Network(expected_slice)

    assert host_slice.gateway.ip == slice_.network_address + 1
    assert host_slice.gateway.network == slice_


def test_bridge_name_of_widest_dotted_slice_fits():
    assert bridge_name(IPv4Network("250.250.250.0/24")) == "fan-250-250-250"
    assert len(bridge_name(IPv4Network("250.250.250.0/24"))) == IFNAME_MAX


def test_overlay_16_over_underlay_16_is_rejected_with_a_clear_message():
    with pytest.raises(FanError) as err:
        fan("10.100.0.0/16", "172.30.0.0/16")

    message = str(err.value)
    assert "too small" in message
    assert "10.100.0.0/16" in message and "172.30.0.0/16" in message
    assert "/32" in message                # what each host would get
    assert "at most /8" in message         # what to use instead


def test_overlay_overlapping_underlay_is_rejected_with_a_clear_message():
    with pytest.raises(FanError) as err:
        fan("10.0.0.0/8", "10.1.0.0/16")

    message = str(err.value)
    assert "overlaps underlay" in message
    assert "10.0.0.0/8" in message and "10.1.0.0/16" in message


def test_overlay_inside_underlay_is_rejected():
    with pytest.raises(FanError, match="overlaps underlay"):
        fan("172.30.5.0/24", "172.30.0.0/16")


def test_slice_for_an_address_outside_the_underlay_is_refused():
    with pytest.raises(FanError, match="not in underlay 172.30.0.0/16"):
        fan("250.0.0.0/8", "172.30.0.0/16").slice_for(IPv4Address("10.0.0.1"))


def test_underlay_for_an_address_outside_the_overlay_is_refused():
    with pytest.raises(FanError, match="not in overlay 250.0.0.0/8"):
        underlay_for(fan("250.0.0.0/8", "172.30.0.0/16"), IPv4Address("251.0.0.1"))


def test_peers_are_every_other_host_with_its_slice():
    fan_map = fan("250.0.0.0/8", "10.0.0.0/29")   # hosts .1 .. .6

    peers = dict(fan_map.peers(IPv4Address("10.0.0.3")))

    assert sorted(peers) == [IPv4Address(f"10.0.0.{i}") for i in (1, 2, 4, 5, 6)]
    assert peers[IPv4Address("10.0.0.5")] == IPv4Network("250.160.0.0/11")


# --- properties over random valid fans ------------------------------------------------

@st.composite
def fans(draw):
    """A valid fan: overlay /O, underlay /U, O + (32 - U) <= 24, no overlap."""
    o = draw(st.integers(min_value=4, max_value=24))
    u = draw(st.integers(min_value=o + 8, max_value=32))
    # Overlays come from the unicast ranges a container address can be in.
    base = draw(st.integers(0x01000000, 0x7EFFFFFF) | st.integers(0x80000000, 0xDFFFFFFF)
                | st.integers(0xF0000000, 0xFEFFFFFF))
    overlay = IPv4Network((base, o), strict=False)
    underlay = IPv4Network((draw(st.integers(0, 2**32 - 1)), u), strict=False)
    assume(not overlay.overlaps(underlay))
    assume(not any(overlay.overlaps(n) for n in UNUSABLE))
    return FanMap(overlay, underlay)


def host_in(fan_map: FanMap):
    size = fan_map.underlay.num_addresses
    return st.integers(0, size - 1).map(lambda i: fan_map.underlay.network_address + i)


@given(data=st.data())
@settings(max_examples=200)
def test_property_slice_and_underlay_round_trip(data):
    fan_map = data.draw(fans())
    host = data.draw(host_in(fan_map))

    slice_ = fan_map.slice_for(host)
    offset = data.draw(st.integers(0, slice_.num_addresses - 1))

    assert slice_.prefixlen == fan_map.overlay.prefixlen + 32 - fan_map.underlay.prefixlen
    assert slice_.prefixlen <= 24
    assert slice_.subnet_of(fan_map.overlay)
    assert underlay_for(fan_map, slice_.network_address + offset) == host


@given(data=st.data())
@settings(max_examples=200)
def test_property_every_overlay_address_belongs_to_the_host_it_maps_to(data):
    fan_map = data.draw(fans())
    address = fan_map.overlay.network_address + data.draw(
        st.integers(0, fan_map.overlay.num_addresses - 1))

    owner = underlay_for(fan_map, address)

    assert owner in fan_map.underlay
    assert address in fan_map.slice_for(owner)


@given(data=st.data())
@settings(max_examples=200)
def test_property_distinct_hosts_have_disjoint_slices_and_distinct_bridges(data):
    fan_map = data.draw(fans())
    size = fan_map.underlay.num_addresses
    assume(size > 1)
    first_index = data.draw(st.integers(0, size - 1))
    step = data.draw(st.integers(1, size - 1))
    first = fan_map.underlay.network_address + first_index
    second = fan_map.underlay.network_address + (first_index + step) % size

    first_slice, second_slice = fan_map.slice_for(first), fan_map.slice_for(second)

    assert not first_slice.overlaps(second_slice)
    assert bridge_name(first_slice) != bridge_name(second_slice)


@given(data=st.data())
@settings(max_examples=200)
def test_property_bridge_name_is_a_valid_interface_name(data):
    fan_map = data.draw(fans())
    name = HostSlice(fan_map, data.draw(host_in(fan_map))).bridge_name

    assert name.startswith("fan-")
    assert 1 <= len(name) <= IFNAME_MAX
    assert "/" not in name and not any(c.isspace() for c in name)


@pytest.mark.parametrize("overlay", ["230.0.0.0/8", "127.0.0.0/8", "0.0.0.0/8", "224.0.0.0/3"])
def test_overlay_without_container_addresses_is_refused(overlay):
    with pytest.raises(FanError, match="cannot be given to containers"):
        FanMap(IPv4Network(overlay), IPv4Network("172.30.0.0/16"))
