"""fan.h's constants against the Python ones they restate (C cannot import them)."""
import re
from pathlib import Path

from fan_driver.dataplane.encap import ENCAPS, IPIP, VXLAN
from fan_driver.dataplane.encap.vxlan import PORT as VXLAN_PORT
from fan_driver.dataplane.plan import OUTER_TTL

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
    assert found["FAN_VXLAN_PORT"] == VXLAN_PORT
    assert found["FAN_OUTER_TTL"] == OUTER_TTL
    assert found["FAN_VXLAN_ROOM"] == VXLAN.overhead
    assert found["FAN_IPIP_ROOM"] == IPIP.overhead


def test_fan_h_has_each_encapsulations_value_and_no_other():
    assert encap_enum() == {name.upper(): e.bpf_encap for name, e in ENCAPS.items()}
