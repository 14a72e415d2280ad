"""DNAT rules of others, read from `iptables -t nat -S` as printed. Pure."""
from ipaddress import IPv4Address

from fan_driver.dataplane.dnat import first_taker, foreign_dnat
from fan_driver.ports import PortBinding

# Docker 28's bridge with "userland-proxy": false, a tool's own chain jumped
# from PREROUTING, a chain nothing jumps to, and fan-driver's own rule.
NAT = """\
-P PREROUTING ACCEPT
-P INPUT ACCEPT
-P OUTPUT ACCEPT
-P POSTROUTING ACCEPT
-N DOCKER
-N FAN-PORTS
-N TOOL
-N UNUSED
-A PREROUTING -m addrtype --dst-type LOCAL -j FAN-PORTS
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A PREROUTING -p udp -m comment --comment "the tool's forwards" -j TOOL
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A DOCKER -i docker0 -j RETURN
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8095 -j DNAT --to-destination 172.17.0.2:80
-A DOCKER -d 127.0.0.1/32 ! -i docker0 -p tcp -m tcp --dport 8096 -j DNAT --to-destination 172.17.0.3:80
-A FAN-PORTS -p tcp -m tcp --dport 8080 -m comment --comment "fan-driver 555555555555 eeeeeeeeeeee" -j DNAT --to-destination 250.0.28.2:80
-A TOOL -d 172.30.0.0/24 -p udp -m udp --dport 5000:5010 -m comment --comment "a tool" -j DNAT --to-destination 10.0.0.1
-A TOOL -p udp -m multiport --dports 53,6000:6001 -j DNAT --to-destination 10.0.0.2
-A TOOL -p udp -j DNAT --to-destination 10.0.0.3
-A UNUSED -p tcp -m tcp --dport 9999 -j DNAT --to-destination 10.0.0.4:80
"""


def binding(port, proto="tcp", host_ip="0.0.0.0") -> PortBinding:
    return PortBinding(proto, IPv4Address(host_ip), port, 80)


def taker(port, proto="tcp", host_ip="0.0.0.0"):
    rule = first_taker(binding(port, proto, host_ip), foreign_dnat(NAT.splitlines()))
    return rule and rule.chain


def test_reachable_dnat_rules_that_are_not_ours_take_their_ports():
    assert taker(8095) == "DOCKER"
    assert taker(8095, host_ip="172.30.0.28") == "DOCKER"   # no -d: every address
    assert taker(8095, "udp") is None
    assert taker(8080) is None                               # ours
    assert taker(9999) is None                               # nothing jumps to UNUSED


def test_an_address_taken_only_where_the_rule_says():
    assert taker(8096) == "DOCKER"                           # 0.0.0.0 includes 127.0.0.1
    assert taker(8096, host_ip="127.0.0.1") == "DOCKER"
    assert taker(8096, host_ip="172.30.0.28") is None


def test_port_ranges_and_multiport_lists():
    assert [taker(p, "udp", "172.30.0.28") for p in (4999, 5000, 5010, 5011)] == \
        [None, "TOOL", "TOOL", None]
    assert taker(5005, "udp", "172.30.1.1") is None          # outside -d 172.30.0.0/24
    assert [taker(p, "udp") for p in (53, 6001, 6002)] == ["TOOL", "TOOL", None]


def test_the_holder_is_named_with_the_rule():
    (rule,) = [r for r in foreign_dnat(NAT.splitlines()) if r.chain == "DOCKER"][:1]
    assert rule.describe() == ("nat chain DOCKER: -A DOCKER ! -i docker0 -p tcp -m tcp "
                               "--dport 8095 -j DNAT --to-destination 172.17.0.2:80")


def test_negations():
    rules = foreign_dnat([
        "-A PREROUTING ! -d 10.0.0.0/8 -p tcp -m tcp ! --dport 22 -j DNAT --to-destination 1.2.3.4"])
    assert first_taker(binding(8080), rules) is not None
    assert first_taker(binding(22), rules) is None
    assert first_taker(binding(8080, host_ip="10.1.1.1"), rules) is None
    assert first_taker(binding(8080, host_ip="172.30.0.28"), rules) is not None
