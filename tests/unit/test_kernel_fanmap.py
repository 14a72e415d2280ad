"""The hand-built RTM_NEWLINK for Ubuntu's fan-mapped tunnels (the kernel that
takes it is not available here: only the encoding is checked)."""
import struct
from ipaddress import IPv4Address, IPv4Network

from fan_driver.dataplane.encap import IPIP, VXLAN
from fan_driver.config import VXLAN_PORT
from fan_driver.dataplane.mapping.kernel_fanmap import FAN_MAP, fan_mapping, newlink_message
from fan_driver.dataplane.plan import NetworkPlan
from fan_driver.fanmap import FanMap, HostSlice

FAN = FanMap(IPv4Network("250.0.0.0/8"), IPv4Network("172.30.0.0/16"))


def plan(encap):
    return NetworkPlan(network_id="ab" * 32, host=HostSlice(FAN, IPv4Address("172.30.0.28")),
                       underlay_interface="eth0", mtu=1480, encap=encap, mapping="kernel",
                       tc_pref=1, vxlan_port=VXLAN_PORT if encap is VXLAN else None)


def attrs(data: bytes) -> dict:
    """rtattrs -> {type (without flags): payload}."""
    found, offset = {}, 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        found[kind & 0x3FFF] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return found


def test_fan_mapping_struct_is_underlay_overlay_then_prefixes():
    raw = fan_mapping(FAN)
    assert raw == bytes([172, 30, 0, 0, 250, 0, 0, 0]) + struct.pack("=HH", 16, 8)


def test_ipip_message_carries_name_local_and_the_fan_map():
    msg = newlink_message("fanm-fa0000", plan(IPIP), underlay_index=2)
    length, kind = struct.unpack_from("=IH", msg)
    assert length == len(msg) and kind == 16
    top = attrs(msg[32:])
    assert top[3] == b"fanm-fa0000\0" and struct.unpack("=I", top[4])[0] == 1480
    info = attrs(top[18])
    assert info[1] == b"ipip\0"
    data = attrs(info[2])
    assert data[2] == IPv4Address("172.30.0.28").packed
    assert struct.unpack("=I", data[1])[0] == 2
    assert attrs(data[FAN_MAP])[1] == fan_mapping(FAN)


def test_vxlan_message_carries_vni_and_port():
    data = attrs(attrs(attrs(newlink_message("fanm-fa0000", plan(VXLAN), 2)[32:])[18])[2])
    assert struct.unpack("=I", data[1])[0] == 0xFA0000
    assert struct.unpack("!H", data[15])[0] == VXLAN_PORT
    assert attrs(data[FAN_MAP])[1] == fan_mapping(FAN)
