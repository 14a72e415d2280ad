"""fan.h's constants against the Python ones they restate (C cannot import them)."""
import re
import struct
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from fan_driver.dataplane.bpf import Config
from fan_driver.dataplane.encap import ENCAPS, IPIP, VXLAN
from fan_driver.dataplane.plan import OUTER_TTL
from fan_driver.fanmap import FanMap

FAN_H = Path(__file__).resolve().parents[2] / "fan_driver" / "dataplane" / "bpf" / "fan.h"


def defines() -> dict:
    """Each `#define NAME <integer arithmetic>` of fan.h, evaluated."""
    found = {}
    for name, value in re.findall(r"^#define (\w+) ([^/\n]+)", FAN_H.read_text(), re.M):
        if re.fullmatch(r"[\d\sx+()]+", value.strip()):
            found[name] = eval(value, {})
    return found


def encap_enum() -> dict:
    """enum fan_encap of fan.h: name -> value."""
    body = re.search(r"enum fan_encap \{(.*?)\};", FAN_H.read_text(), re.S).group(1)
    return {name: int(value) for name, value in re.findall(r"FAN_ENCAP_(\w+) = (\d+)", body)}


def test_fan_h_says_what_the_python_side_says():
    found = defines()
    assert "FAN_VXLAN_PORT" not in found   # each network's, in struct fan_config
    assert found["FAN_OUTER_TTL"] == OUTER_TTL
    assert found["FAN_VXLAN_ROOM"] == VXLAN.overhead
    assert found["FAN_IPIP_ROOM"] == IPIP.overhead


def test_fan_h_has_each_encapsulations_value_and_no_other():
    assert encap_enum() == {name.upper(): e.bpf_encap for name, e in ENCAPS.items()}


# struct fan_config's field types as the loader packs them (struct module codes)
C_TYPES = {"__u32": "I", "__u8": "B"}


def config_fields() -> list:
    """struct fan_config of fan.h: (name, struct code, count) per field, in order."""
    body = re.search(r"struct fan_config \{(.*?)\};", FAN_H.read_text(), re.S).group(1)
    fields = []
    for ctype, names in re.findall(r"^\s*(__u\d+) ([^;]+);", body, re.M):
        for name in names.split(","):
            name, _, count = name.strip().partition("[")
            fields.append((name, C_TYPES[ctype], int(count.rstrip("]") or 1)))
    return fields


def test_the_loader_packs_struct_fan_config_field_for_field():
    fields = config_fields()
    assert ("vxlan_port", "I", 1) in fields
    layout = "=" + "".join(f"{count}{code}" if count > 1 else code
                           for _, code, count in fields)
    assert struct.calcsize(layout) == Config.LAYOUT.size
    # the same sequence of field types (the loader writes the MAC as 6s, the pad as 3x)
    packed = Config.LAYOUT.format.replace("6s", "6B").replace("3x", "3B")
    assert struct.Struct(packed).size == struct.Struct(layout).size
    expanded = "".join(code * count for _, code, count in fields)
    assert re.sub(r"(\d+)(\w)", lambda m: m.group(2) * int(m.group(1)), packed[1:]) == expanded


def test_the_networks_vxlan_port_is_packed_where_fan_h_has_it():
    config = Config(FanMap(IPv4Network("250.0.0.0/8"), IPv4Network("172.30.0.0/16")),
                    IPv4Network("250.0.28.0/24"), 0xFA0000, VXLAN.bpf_encap,
                    IPv4Address("172.30.0.28"), 7, 8, 9, VXLAN.device_mac, vxlan_port=4790)
    names = [name for name, _, _ in config_fields()]
    values = Config.LAYOUT.unpack(config.pack())
    assert values[names.index("vxlan_port")] == 4790
    assert values[names.index("bridge_ifindex")] == 9
    assert values[names.index("tunnel_mac")] == bytes.fromhex("0efa00000001")
