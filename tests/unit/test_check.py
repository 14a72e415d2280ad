"""`fan-driver check`: settings validation, judging a probe, formatting (all pure),
and the refusal server the managed plugin runs on invalid settings."""
import json
from ipaddress import IPv4Interface, IPv4Network

import pytest
from aiohttp.test_utils import TestClient, TestServer

from fan_driver.check.judge import judge
from fan_driver.check.probe import Iptables, Probe, PublishedPort, StateInfo
from fan_driver.refusal import refusal_app
from fan_driver.check.report import FAIL, INFO, OK, WARN, Item, exit_status, format_report
from fan_driver.cli import main, parse_args
from fan_driver.hostfacts import HostFacts, Interface, KernelFeatures
from fan_driver.iptables import choose as choose_backend
from fan_driver.settings import Settings

STOCK = KernelFeatures(fan_map=False, ipip=False, vxlan=True, ebpf=True)
EPERM = "loading eBPF program 'fan_check' failed: Operation not permitted (errno 1); verifier log:"


def facts(mtu=1500, routes=("172.30.0.0/16",)) -> HostFacts:
    return HostFacts(
        interfaces=(Interface("eth0", mtu, (IPv4Interface("172.30.0.28/16"),)),),
        default_interface="eth0", routes=tuple(IPv4Network(r) for r in routes))


def healthy_iptables(**changes) -> Iptables:
    values = dict(version="iptables v1.8.9 (nf_tables)", backend="nft",
                  chosen_by="the host's iptables", rules={"nft": 20, "legacy": 0},
                  forward_policy="DROP",
                  fan_chains={"FAN-FORWARD": None, "FAN-POSTROUTING": None})
    values.update(changes)
    return Iptables(**values)


def probe(**changes) -> Probe:
    values = dict(features=STOCK, facts=facts(), iptables=healthy_iptables(),
                  state=StateInfo("/var/lib/fan-driver", exists=False), ip_forward="1")
    values.update(changes)
    return Probe(**values)


def item(items, name) -> Item:
    found = [i for i in items if i.name == name]
    assert found, f"no item {name!r} in {[i.name for i in items]}"
    return found[0]


# --- settings ------------------------------------------------------------------------

def test_default_settings_are_valid():
    assert Settings().problems() == []


@pytest.mark.parametrize("settings,names", [
    (Settings(underlay="bogus"), ["FAN_UNDERLAY='bogus'", "malformed"]),
    (Settings(underlay="eth0/99"), ["FAN_UNDERLAY", "prefix length"]),
    (Settings(encap="gre"), ["FAN_ENCAP='gre'", "auto, ipip, vxlan"]),
    (Settings(log_level="loud"), ["FAN_LOG_LEVEL='loud'", "debug, info, warning, error"]),
    (Settings(iptables="ebtables"), ["FAN_IPTABLES='ebtables'", "auto, nft, legacy"]),
])
def test_an_invalid_setting_is_named_with_its_fix(settings, names):
    problems = settings.problems()
    assert len(problems) == 1
    for fragment in names:
        assert fragment in problems[0]
    assert "docker plugin set fan:latest" in problems[0]
    assert "docker plugin disable -f" in problems[0]


def test_log_level_is_case_insensitive_like_serve():
    assert Settings(log_level="DEBUG").problems() == []


def test_every_invalid_setting_is_reported():
    assert len(Settings(underlay="x", encap="gre", log_level="no", iptables="x").problems()) == 4


# --- judging -------------------------------------------------------------------------

def test_a_stock_kernel_plans_vxlan_with_ebpf():
    items = judge(Settings(), probe())

    assert exit_status(items) == 0
    assert item(items, "tunnel").detail.startswith("vxlan with ebpf mapping")
    assert "172.30.0.0/16 on eth0: this host is 172.30.0.28" in item(items, "underlay").detail
    slice_ = item(items, "slice")
    assert slice_.status == OK and "250.0.28.0/24" in slice_.detail
    assert "bridge fan-250-0-28" in slice_.detail
    assert item(items, "mtu").detail.startswith("1450 ")
    assert item(items, "ipip").status == INFO
    assert item(items, "fan map").status == INFO


def test_ipip_where_the_kernel_has_it_costs_20_bytes():
    features = KernelFeatures(fan_map=False, ipip=True, vxlan=True, ebpf=True)
    items = judge(Settings(), probe(features=features, facts=facts(mtu=9001)))

    assert item(items, "tunnel").detail.startswith("ipip with ebpf mapping")
    assert item(items, "mtu").detail.startswith("8981 ")


def test_the_encap_setting_is_honoured():
    features = KernelFeatures(fan_map=False, ipip=True, vxlan=True, ebpf=True)
    items = judge(Settings(encap="vxlan"), probe(features=features))
    assert item(items, "tunnel").detail.startswith("vxlan")


def test_no_ebpf_for_lack_of_a_capability_says_which():
    features = KernelFeatures(fan_map=False, ipip=False, vxlan=True, ebpf=False)
    items = judge(Settings(), probe(features=features, ebpf_error=EPERM))

    ebpf = item(items, "ebpf")
    assert ebpf.status == WARN
    assert "Operation not permitted" in ebpf.detail
    assert "CAP_BPF" in ebpf.fix
    assert item(items, "tunnel").detail.startswith("vxlan with routes mapping")
    assert exit_status(items) == 0


def test_no_tunnel_at_all_is_a_failure():
    features = KernelFeatures(fan_map=False, ipip=False, vxlan=False, ebpf=True)
    items = judge(Settings(), probe(features=features))

    assert item(items, "vxlan").status == FAIL
    assert item(items, "tunnel").status == FAIL
    assert exit_status(items) == 1


def test_an_explicit_encap_the_kernel_lacks_fails_with_the_alternative():
    items = judge(Settings(encap="ipip"), probe())

    tunnel = item(items, "tunnel")
    assert tunnel.status == FAIL and "encap=vxlan" in tunnel.detail


def test_an_underlay_that_matches_nothing_fails_with_how_to_name_one():
    items = judge(Settings(underlay="10.99.0.0/16"), probe())

    underlay = item(items, "underlay")
    assert underlay.status == FAIL
    assert "matches no address" in underlay.detail
    assert "--ipam-opt underlay=" in underlay.fix
    assert not [i for i in items if i.name in ("slice", "mtu")]


def test_no_default_route_means_default_underlay_cannot_resolve():
    no_default = HostFacts(interfaces=facts().interfaces, default_interface=None, routes=())
    items = judge(Settings(), probe(facts=no_default))
    assert "no default route" in item(items, "underlay").detail


def test_an_overlay_too_small_for_the_underlay_fails():
    items = judge(Settings(), probe(), overlay="250.0.0.0/16")
    assert item(items, "slice").status == FAIL
    assert "too small" in item(items, "slice").detail


def test_an_overlay_clashing_with_a_route_warns_unless_it_is_ours():
    clash = probe(facts=facts(routes=("172.30.0.0/16", "250.1.0.0/16")))
    assert item(judge(Settings(), clash), "overlay").status == WARN

    ours = probe(facts=facts(routes=("172.30.0.0/16", "250.0.0.0/8")),
                 state=StateInfo("/s", networks=("abc: ...",), overlays=("250.0.0.0/8",)))
    overlay = item(judge(Settings(), ours), "overlay")
    assert overlay.status == INFO and "already in use" in overlay.detail


def test_a_tiny_underlay_mtu_fails():
    items = judge(Settings(), probe(facts=facts(mtu=600)))
    assert item(items, "mtu").status == FAIL


def test_invalid_settings_fail_and_skip_the_plan():
    items = judge(Settings(underlay="bogus"), probe())

    assert item(items, "setting").status == FAIL
    assert not [i for i in items if i.section == "plan"]
    assert item(items, "vxlan").status == OK       # the kernel is still reported
    assert exit_status(items) == 1


def test_a_kernel_that_cannot_be_probed_fails_naming_the_capability():
    items = judge(Settings(), probe(features=None, facts=None,
                                    netlink_error="NetlinkError: (1, 'Operation not permitted')"))
    netlink = item(items, "netlink")
    assert netlink.status == FAIL and "CAP_NET_ADMIN" in netlink.fix


def test_missing_iptables_fails_with_the_package_to_install():
    items = judge(Settings(), probe(iptables=Iptables(installed=False)))
    ipt = item(items, "iptables")
    assert ipt.status == FAIL and "apt-get install iptables" in ipt.fix


def test_iptables_without_permission_fails():
    broken = healthy_iptables(error="iptables v1.8.9 (legacy): can't initialize iptables table "
                                    "`filter': Permission denied (you must be root)")
    ipt = item(judge(Settings(), probe(iptables=broken)), "iptables")
    assert ipt.status == FAIL and "Permission denied" in ipt.detail


def test_rules_in_the_other_backend_warn_with_the_setting_to_use():
    legacy_host = healthy_iptables(rules={"nft": 0, "legacy": 30})
    backend = item(judge(Settings(), probe(iptables=legacy_host)), "backend")

    assert backend.status == WARN
    assert "legacy" in backend.detail
    assert "FAN_IPTABLES=legacy" in backend.fix


def test_forwarding_off_warns():
    forward = item(judge(Settings(), probe(ip_forward="0")), "ip_forward")
    assert forward.status == WARN and "net.ipv4.ip_forward=1" in forward.fix


def test_state_lists_networks_and_reports_corruption():
    state = StateInfo("/var/lib/fan-driver", networks=("0123456789ab: bridge fan-250-0-28",),
                      overlays=("250.0.0.0/8",))
    items = judge(Settings(), probe(state=state))
    assert item(items, "network").detail.startswith("0123456789ab")

    broken = judge(Settings(), probe(state=StateInfo("/s", error="state file /s is corrupt")))
    assert item(broken, "state").status == FAIL


@pytest.mark.parametrize("in_image,version,rules,forced,expected", [
    (False, "iptables v1.8.9 (nf_tables)", {"nft": 0, "legacy": 9}, "auto", "nft"),
    (False, "iptables v1.8.7 (legacy)", {"nft": 9, "legacy": 0}, "auto", "legacy"),
    (True, "", {"nft": 3, "legacy": 9}, "auto", "legacy"),
    (True, "", {"nft": 9, "legacy": 3}, "auto", "nft"),
    (True, "", {"nft": None, "legacy": None}, "auto", "nft"),
    (True, "", {"nft": 9, "legacy": 0}, "legacy", "legacy"),
])
def test_the_backend_in_the_plugin_image_is_the_setting_or_the_fuller_one(
        in_image, version, rules, forced, expected):
    assert choose_backend(in_image, version, rules, forced)[0] == expected


# --- formatting ----------------------------------------------------------------------

def test_format_groups_by_section_and_ends_with_a_verdict():
    items = [Item("kernel", "vxlan", OK, "VXLAN devices can be created"),
             Item("kernel", "ebpf", WARN, "unavailable", "add CAP_BPF"),
             Item("firewall", "ip_forward", OK, "on", "never shown for ok items")]
    text = format_report(items)
    lines = text.splitlines()

    assert lines[0] == "fan-driver check"
    assert lines[1] == "kernel features:"
    assert lines[2].split() == ["ok", "vxlan", "VXLAN", "devices", "can", "be", "created"]
    assert lines[3].split()[:2] == ["warn", "ebpf"]
    assert lines[4].strip() == "fix: add CAP_BPF"
    assert lines[5] == "firewall:"
    assert "never shown" not in text
    assert lines[-1] == "ready: fan networks can be created here (1 warning(s): ebpf)"


def test_format_names_the_failures():
    text = format_report([Item("plan", "underlay", FAIL, "matches no address", "name one")])
    assert text.splitlines()[-1].startswith("NOT READY: 1 problem(s)")
    assert "underlay" in text.splitlines()[-1]


def test_long_details_wrap_under_their_column():
    text = format_report([Item("kernel", "ebpf", WARN, "word " * 60, "fix " * 40)], columns=80)
    lines = text.splitlines()[2:-1]
    assert all(len(line) <= 80 for line in lines)
    assert all(line.startswith(" " * 14) for line in lines[1:])


def test_format_of_a_whole_judgement_is_stable_text():
    text = format_report(judge(Settings(), probe()))
    assert "250.0.28.0/24" in text and "1450" in text
    assert text.splitlines()[-1] == "ready: fan networks can be created here"


# --- the command line ------------------------------------------------------------------

def test_check_takes_its_settings_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("FAN_UNDERLAY", "eth1/24")
    monkeypatch.setenv("FAN_ENCAP", "bogus")        # no argparse choices: check reports it
    args = parse_args(["check", "--settings"])
    assert args.command == "check"
    assert main(["check", "--settings"]) == 1
    assert "FAN_ENCAP='bogus'" in capsys.readouterr().err


def test_settings_only_exit_status(capsys):
    assert main(["check", "--settings", "--default-encap", "vxlan"]) == 0
    assert main(["check", "--settings", "--default-underlay", "bogus"]) == 1
    assert "FAN_UNDERLAY='bogus'" in capsys.readouterr().err
    assert main(["check", "--settings", "--overlay", "250.0.0.0/33"]) == 1
    assert "--overlay '250.0.0.0/33'" in capsys.readouterr().err


def test_serve_refuses_an_invalid_setting_before_touching_the_host(monkeypatch, capsys):
    monkeypatch.setenv("FAN_LOG_LEVEL", "loud")
    assert main(["serve", "--state-dir", "/nonexistent/fan"]) == 1
    assert "FAN_LOG_LEVEL='loud'" in capsys.readouterr().err


# --- the refusal server ------------------------------------------------------------------

@pytest.fixture
async def refusing():
    app = refusal_app("fan-driver cannot start: setting FAN_UNDERLAY='bogus' is invalid")
    async with TestClient(TestServer(app)) as client:
        yield client


async def call(client, method, body=None):
    resp = await client.post(f"/{method}", data=json.dumps(body or {}))
    return resp.status, json.loads(await resp.text())


async def test_refusal_server_registers_both_drivers(refusing):
    assert await call(refusing, "Plugin.Activate") == (
        200, {"Implements": ["NetworkDriver", "IpamDriver"]})
    assert (await call(refusing, "NetworkDriver.GetCapabilities"))[0] == 200
    assert (await call(refusing, "IpamDriver.GetCapabilities"))[0] == 200
    assert await call(refusing, "IpamDriver.GetDefaultAddressSpaces") == (
        200, {"LocalDefaultAddressSpace": "fan", "GlobalDefaultAddressSpace": "fan"})


@pytest.mark.parametrize("method,body", [
    ("IpamDriver.RequestPool", {"Pool": "250.0.0.0/8", "Options": {}}),
    ("IpamDriver.RequestAddress", {"PoolID": "fan:250.0.0.0/8", "Address": ""}),
    ("NetworkDriver.CreateNetwork", {"NetworkID": "5" * 64, "IPv4Data": []}),
    ("NetworkDriver.Join", {"NetworkID": "5" * 64, "EndpointID": "e" * 64}),
])
async def test_refusal_server_answers_every_driver_call_with_the_problem(refusing, method, body):
    status, reply = await call(refusing, method, body)
    assert status == 500
    assert reply["Err"].startswith("fan-driver cannot start: setting FAN_UNDERLAY='bogus'")


async def test_refusal_server_still_404s_unknown_methods(refusing):
    assert (await call(refusing, "NetworkDriver.NoSuchMethod"))[0] == 404


def test_no_ebpf_for_lack_of_libbpf_names_the_package():
    from fan_driver.dataplane import libbpf
    features = KernelFeatures(fan_map=False, ipip=False, vxlan=True, ebpf=False)
    missing = f"{libbpf.LIBRARY} cannot be loaded (not found): install the {libbpf.PACKAGE} package"
    items = judge(Settings(), probe(features=features, ebpf_error=missing))
    assert "libbpf1" in item(items, "ebpf").fix
    assert item(items, "tunnel").detail.startswith("vxlan with routes mapping")


# --- published ports ----------------------------------------------------------------------

def published(**changes) -> PublishedPort:
    values = dict(network="555555555555", endpoint="eeeeeeeeeeee",
                  binding="0.0.0.0:8080->80/tcp", loopback=False, dnat=True,
                  listener="python3 (pid 7, listening on the host)")
    values.update(changes)
    return PublishedPort(**values)


def port_items(*ports):
    return [i for i in judge(Settings(), probe(ports=ports)) if i.section == "ports"]


def test_published_ports_with_their_rules_are_ok():
    (item,) = port_items(published(), published(binding="127.0.0.1:8081->80/tcp",
                                                loopback=True, dnat=False))
    assert (item.status, item.detail) == (OK, "2 published port(s), each with its DNAT rule "
                                              "(loopback ones: the proxy alone)")
    assert port_items() == []


def test_a_port_left_to_the_process_that_took_it_is_a_warning_naming_it():
    (item,) = port_items(published(dnat=False, listener="nc (pid 42, listening on the host)"))
    assert (item.status, item.name) == (WARN, "port 0.0.0.0:8080")
    assert "endpoint eeeeeeeeeeee of fan network 555555555555 publishes 0.0.0.0:8080->80/tcp" \
        in item.detail
    assert "nc (pid 42, listening on the host) holds that host port" in item.detail
    assert "stop what holds the port, then restarting fan-driver" in item.fix
    assert exit_status(judge(Settings(), probe(ports=(published(dnat=False),)))) == 0


def test_a_port_forwarded_by_another_dnat_rule_is_a_warning_naming_the_rule():
    rule = "nat chain DOCKER: -A DOCKER -p tcp -m tcp --dport 8080 -j DNAT"
    (left,) = port_items(published(dnat=False, listener=None, foreign=rule))
    assert "fan-driver left it without its own rule" in left.detail and rule in left.detail
    (both,) = port_items(published(foreign=rule))
    assert "fan-driver's rule comes first" in both.detail
    assert both.fix == "publish one of them on another host port"


def test_a_port_without_rule_or_holder_says_to_restore():
    (item,) = port_items(published(dnat=False, listener=None))
    assert "has no DNAT rule" in item.detail and "start fan-driver" in item.fix
