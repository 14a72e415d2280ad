"""The encapsulation registry and how `choose` picks from it: pure."""
import dataclasses
from ipaddress import IPv4Address

import pytest

from fan_driver.config import ENCAPS as ENCAP_OPTIONS
from fan_driver.dataplane import choose
from fan_driver.dataplane.encap import ENCAPS, IPIP, TUNNEL_UDP_PORTS, VXLAN, encap_named
from fan_driver.errors import FanError
from fan_driver.hostfacts import KernelFeatures


def features(**kw) -> KernelFeatures:
    return KernelFeatures(**{"fan_map": False, "ipip": True, "vxlan": True, "ebpf": True, **kw})


def test_every_registered_encapsulation_is_an_option_and_a_kernel_feature():
    assert ENCAP_OPTIONS == ("auto", *ENCAPS)
    fields = {f.name for f in dataclasses.fields(KernelFeatures)}
    assert set(ENCAPS) <= fields
    assert all(name == e.name for name, e in ENCAPS.items())


def test_each_encapsulation_has_its_own_values():
    for field in ("bpf_encap", "device"):
        assert len({getattr(e, field) for e in ENCAPS.values()}) == len(ENCAPS), field
    assert len({e.routes_device(0x123) for e in ENCAPS.values()}) == len(ENCAPS)
    assert TUNNEL_UDP_PORTS == (4789, 8472)


def test_auto_prefers_the_least_overhead_the_kernel_has():
    assert choose("auto", "ebpf", "auto", features())[0] is IPIP
    assert choose("auto", "ebpf", "auto", features(ipip=False))[0] is VXLAN


def test_auto_without_any_tunnel_device_names_them():
    with pytest.raises(FanError, match=r"none of the fan's tunnel devices \(ipip, vxlan\)"):
        choose("auto", "ebpf", "auto", features(ipip=False, vxlan=False))


def test_an_encapsulation_the_kernel_lacks_names_the_others():
    with pytest.raises(FanError, match="cannot create ipip devices; use encap=auto or encap=vxlan"):
        choose("ipip", "ebpf", "auto", features(ipip=False))


def test_an_unknown_encapsulation_is_refused_by_name():
    with pytest.raises(FanError, match="encap=gre is not available .* use one of: ipip, vxlan or auto"):
        choose("gre", "ebpf", "auto", features())
    with pytest.raises(FanError, match="encap=gre"):
        encap_named("gre")


def test_the_receive_shortcut_is_the_encapsulations_to_offer():
    assert choose("vxlan", "ebpf", "direct", features())[2] == "direct"
    with pytest.raises(FanError, match="needs mapping=ebpf and encap=vxlan"):
        choose("ipip", "ebpf", "direct", features())


def test_the_shared_vxlan_device_is_one_per_port_named_after_it():
    assert VXLAN.external_device(4789) == "fan-vxlan"
    assert VXLAN.external_device(4790) == "fan-vxlan-4790"
    assert len(VXLAN.external_device(65535)) == 15   # IFNAMSIZ - 1
    assert VXLAN.external_spec(4790)["vxlan_port"] == 4790
    assert VXLAN.routes_spec(0x123, IPv4Address("172.30.0.28"), 2, 4790)["vxlan_port"] == 4790
    assert IPIP.external_device(None) == "fan-ipip"
    for name in ("fan-vxlan", "fan-vxlan-4790", "fan-vxlan-1"):
        assert VXLAN.is_external_device(name) and not IPIP.is_external_device(name)
    for name in ("fan-vxlanx", "fan-vxlan-", "fan-vxlan-ab", "fan-ipip", "fanr-00fa00"):
        assert not VXLAN.is_external_device(name)
    assert IPIP.is_external_device("fan-ipip")
