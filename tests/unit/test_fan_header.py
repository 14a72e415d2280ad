"""fan.h's constants against the Python ones they restate (C cannot import them)."""
import re
from pathlib import Path

from fan_driver.dataplane.plan import IPIP, OUTER_TTL, VXLAN, VXLAN_PORT

FAN_H = Path(__file__).resolve().parents[2] / "fan_driver" / "dataplane" / "bpf" / "fan.h"


def defines() -> dict:
    """Each `#define NAME <integer arithmetic>` of fan.h, evaluated."""
    found = {}
    for name, value in re.findall(r"^#define (\w+) ([^/\n]+)", FAN_H.read_text(), re.M):
        if re.fullmatch(r"[\d\sx+()]+", value.strip()):
            found[name] = eval(value, {})
    return found


def test_fan_h_says_what_the_python_side_says():
    found = defines()
    assert found["FAN_VXLAN_PORT"] == VXLAN_PORT
    assert found["FAN_OUTER_TTL"] == OUTER_TTL
    assert found["FAN_VXLAN_ROOM"] == VXLAN.overhead
    assert found["FAN_IPIP_ROOM"] == IPIP.overhead
