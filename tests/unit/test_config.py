"""Parsing Docker's options and resolving the underlay against (hand-built) host facts."""
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from fan_driver.config import MTU_OPTION, NetworkOptions, UnderlaySpec, parse_ipam_options
from fan_driver.errors import FanError
from fan_driver.hostfacts import HostFacts, Interface, Underlay, resolve_underlay


def facts(default="eth0", routes=()):
    """A host with eth0 on 172.30.0.28/16 (and a second address), eth1 on 10.9.8.7/24,
    and an interface without IPv4."""
    return HostFacts(
        interfaces=(
            Interface("eth0", 1500, (IPv4Interface("172.30.0.28/16"),
                                     IPv4Interface("192.168.7.3/24"))),
            Interface("eth1", 9001, (IPv4Interface("10.9.8.7/24"),)),
            Interface("wg0", 1420, ()),
        ),
        default_interface=default,
        routes=tuple(IPv4Network(r) for r in routes))


# --- UnderlaySpec.parse ---------------------------------------------------------------

def test_parse_address_block():
    spec = UnderlaySpec.parse("172.30.0.0/16")

    assert spec.network == IPv4Network("172.30.0.0/16")
    assert spec.interface is None
    assert spec.prefixlen == 16
    assert spec.text == "172.30.0.0/16"


def test_parse_address_with_host_bits_gives_its_block():
    assert UnderlaySpec.parse("172.30.0.28/16").network == IPv4Network("172.30.0.0/16")


def test_parse_interface_with_length():
    spec = UnderlaySpec.parse("eth0/16")

    assert spec.interface == "eth0"
    assert spec.network is None
    assert spec.prefixlen == 16


def test_parse_default_route_interface():
    spec = UnderlaySpec.parse("default/16")

    assert spec.interface == "default"
    assert spec.prefixlen == 16


@pytest.mark.parametrize("text", ["eth0/1", "eth0/30", "enp0s31f6.100/24", "a" * 15 + "/20"])
def test_parse_accepts_edge_lengths_and_names(text):
    assert UnderlaySpec.parse(text).text == text


@pytest.mark.parametrize("text, complaint", [
    ("172.30.0.0", "malformed"),             # no slash
    ("eth0", "malformed"),
    ("eth0/16/16", "malformed"),
    (None, "malformed"),
    ("eth0/", "prefix length"),
    ("eth0/x", "prefix length"),
    ("eth0/-1", "prefix length"),
    ("eth0/0", "prefix length"),
    ("eth0/31", "prefix length"),
    ("172.30.0.0/32", "prefix length"),
    ("eth0/ 16", "prefix length"),
    ("a b/16", "neither an IPv4 address nor a valid interface name"),
    ("a" * 16 + "/16", "neither an IPv4 address nor a valid interface name"),
    ("eth0;rm/16", "neither an IPv4 address nor a valid interface name"),
    ("$(reboot)/16", "neither an IPv4 address nor a valid interface name"),
    ("eth0`id`/16", "neither an IPv4 address nor a valid interface name"),
    ("/16", "neither an IPv4 address nor a valid interface name"),
])
def test_parse_rejects_malformed_underlay(text, complaint):
    with pytest.raises(FanError) as err:
        UnderlaySpec.parse(text)

    assert complaint in str(err.value)


def test_parse_rejects_interface_name_with_trailing_newline():
    # _IFNAME ends in '$', which also matches just before a final '\n'.
    with pytest.raises(FanError, match="neither an IPv4 address nor a valid interface name"):
        UnderlaySpec.parse("eth0\n/16")


def test_parse_rejects_non_ascii_digit_length_as_fan_error():
    # '²'.isdigit() is True but int('²') raises ValueError: a crash, not a FanError.
    with pytest.raises(FanError, match="prefix length"):
        UnderlaySpec.parse("eth0/²")


# --- resolve_underlay -----------------------------------------------------------------

def test_resolve_address_block_finds_the_address_in_it():
    underlay = resolve_underlay(UnderlaySpec.parse("172.30.0.0/16"), facts())

    assert underlay == Underlay(IPv4Network("172.30.0.0/16"), IPv4Address("172.30.0.28"),
                                "eth0", 1500)


def test_resolve_address_block_matching_a_secondary_address():
    underlay = resolve_underlay(UnderlaySpec.parse("192.168.7.0/24"), facts())

    assert (underlay.address, underlay.interface) == (IPv4Address("192.168.7.3"), "eth0")


def test_resolve_address_block_on_another_interface_reads_its_mtu():
    underlay = resolve_underlay(UnderlaySpec.parse("10.9.0.0/16"), facts())

    assert underlay == Underlay(IPv4Network("10.9.0.0/16"), IPv4Address("10.9.8.7"),
                                "eth1", 9001)


def test_resolve_interface_form_uses_its_first_address_and_the_given_length():
    underlay = resolve_underlay(UnderlaySpec.parse("eth1/16"), facts())

    assert underlay == Underlay(IPv4Network("10.9.0.0/16"), IPv4Address("10.9.8.7"),
                                "eth1", 9001)


def test_resolve_default_uses_the_default_route_interface():
    underlay = resolve_underlay(UnderlaySpec.parse("default/16"), facts(default="eth1"))

    assert underlay.interface == "eth1"
    assert underlay.network == IPv4Network("10.9.0.0/16")
    assert underlay.address == IPv4Address("10.9.8.7")


def test_resolve_unknown_interface_names_it_and_lists_the_known_ones():
    with pytest.raises(FanError) as err:
        resolve_underlay(UnderlaySpec.parse("eth9/16"), facts())

    message = str(err.value)
    assert "'eth9'" in message
    assert "eth0, eth1, wg0" in message


def test_resolve_default_without_default_route_says_what_to_do():
    with pytest.raises(FanError) as err:
        resolve_underlay(UnderlaySpec.parse("default/16"), facts(default=None))

    assert "no default route" in str(err.value)
    assert "--ipam-opt underlay=" in str(err.value)


def test_resolve_interface_without_ipv4_address():
    with pytest.raises(FanError, match="interface wg0 has no IPv4 address"):
        resolve_underlay(UnderlaySpec.parse("wg0/24"), facts())


def test_resolve_block_matching_no_address():
    with pytest.raises(FanError) as err:
        resolve_underlay(UnderlaySpec.parse("10.200.0.0/16"), facts())

    assert "10.200.0.0/16 matches no address on this host" in str(err.value)


# --- NetworkOptions.parse -------------------------------------------------------------

@pytest.mark.parametrize("generic", [None, {}, []])
def test_network_options_defaults(generic):
    assert NetworkOptions.parse(generic) == NetworkOptions(
        underlay=None, encap="auto", host_reserve=1, mtu=None)


def test_network_option_underlay():
    assert NetworkOptions.parse({"underlay": "eth0/16"}).underlay == UnderlaySpec.parse("eth0/16")


@pytest.mark.parametrize("encap", ["auto", "ipip", "vxlan"])
def test_network_option_encap(encap):
    assert NetworkOptions.parse({"encap": encap}).encap == encap


def test_network_option_host_reserve():
    assert NetworkOptions.parse({"host_reserve": "10"}).host_reserve == 10


@pytest.mark.parametrize("value", ["576", "1450", 9000])
def test_network_option_mtu(value):
    assert NetworkOptions.parse({MTU_OPTION: value}).mtu == int(value)


def test_network_options_all_together():
    opts = NetworkOptions.parse({"underlay": "172.30.0.0/16", "encap": "vxlan",
                                 "host_reserve": "5", MTU_OPTION: "1400"})

    assert opts == NetworkOptions(underlay=UnderlaySpec.parse("172.30.0.0/16"),
                                  encap="vxlan", host_reserve=5, mtu=1400)


def test_network_options_unknown_key_is_rejected_by_name():
    with pytest.raises(FanError) as err:
        NetworkOptions.parse({"encap": "vxlan", "colour": "blue"})

    message = str(err.value)
    assert "'colour'" in message
    assert "underlay" in message and "host_reserve" in message   # what is accepted


def test_network_options_bad_encap():
    with pytest.raises(FanError) as err:
        NetworkOptions.parse({"encap": "gre"})

    assert "'gre'" in str(err.value) and "vxlan" in str(err.value)


@pytest.mark.parametrize("value", ["0", "x", "-3", "1.5", ""])
def test_network_options_bad_host_reserve(value):
    with pytest.raises(FanError) as err:
        NetworkOptions.parse({"host_reserve": value})

    assert "host_reserve" in str(err.value) and "at least 1" in str(err.value)


@pytest.mark.parametrize("value", ["575", "0", "big", "-1500"])
def test_network_options_bad_mtu(value):
    with pytest.raises(FanError) as err:
        NetworkOptions.parse({MTU_OPTION: value})

    assert MTU_OPTION in str(err.value) and "at least 576" in str(err.value)


@pytest.mark.parametrize("value", ["1", "4790", "65535"])
def test_network_option_vxlan_port(value):
    options = NetworkOptions.parse({"vxlan_port": value})
    assert options.vxlan_port == int(value)
    assert options.vxlan_port_for("vxlan", "ebpf") == int(value)
    assert options.vxlan_port_for("vxlan", "routes") == int(value)


def test_without_vxlan_port_each_mapping_keeps_its_port():
    options = NetworkOptions.parse({})
    assert options.vxlan_port is None
    assert [options.vxlan_port_for("vxlan", m) for m in ("ebpf", "kernel", "routes")] == \
        [4789, 4789, 8472]
    assert options.vxlan_port_for("ipip", "ebpf") is None


@pytest.mark.parametrize("value", ["0", "65536", "x", "-1", "47.9", "", "²"])
def test_network_options_bad_vxlan_port(value):
    with pytest.raises(FanError) as err:
        NetworkOptions.parse({"vxlan_port": value})

    assert "vxlan_port" in str(err.value) and "from 1 to 65535" in str(err.value)


def test_vxlan_port_applies_to_vxlan_only():
    with pytest.raises(FanError, match="vxlan_port applies to encap=vxlan.*-o encap=vxlan"):
        NetworkOptions.parse({"vxlan_port": "4790", "encap": "ipip"})
    # encap=auto that picks IPIP on this kernel
    with pytest.raises(FanError, match="vxlan_port applies to encap=vxlan.*gets encap=ipip"):
        NetworkOptions.parse({"vxlan_port": "4790"}).vxlan_port_for("ipip", "ebpf")


def test_network_options_non_ascii_digits_are_a_fan_error():
    # Same isdigit()/int() mismatch as in UnderlaySpec.parse.
    with pytest.raises(FanError, match="host_reserve"):
        NetworkOptions.parse({"host_reserve": "²"})


def test_network_options_bad_underlay_is_reported():
    with pytest.raises(FanError, match="malformed"):
        NetworkOptions.parse({"underlay": "eth0"})


@pytest.mark.parametrize("generic", ["underlay=eth0/16", ["underlay"], 42])
def test_network_options_must_be_a_map(generic):
    with pytest.raises(FanError, match="map of KEY=VALUE"):
        NetworkOptions.parse(generic)


# --- parse_ipam_options ---------------------------------------------------------------

@pytest.mark.parametrize("options", [None, {}])
def test_ipam_options_empty_means_no_underlay(options):
    assert parse_ipam_options(options) is None


def test_ipam_options_underlay():
    assert parse_ipam_options({"underlay": "172.30.0.0/16"}) == UnderlaySpec.parse("172.30.0.0/16")


def test_ipam_options_reject_unknown_keys_by_name():
    with pytest.raises(FanError) as err:
        parse_ipam_options({"underlay": "eth0/16", "encap": "vxlan"})

    assert "'encap'" in str(err.value) and "--ipam-opt underlay" in str(err.value)


def test_ipam_options_bad_underlay():
    with pytest.raises(FanError, match="prefix length"):
        parse_ipam_options({"underlay": "eth0/31"})


def test_ipam_options_must_be_a_map():
    with pytest.raises(FanError, match="map of KEY=VALUE"):
        parse_ipam_options(["underlay=eth0/16"])
