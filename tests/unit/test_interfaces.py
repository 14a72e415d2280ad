"""The declared interfaces (fan_driver/dataplane/base.py,
fan_driver/dataplane/encap/base.py, fan_driver/drivers.py) and what implements
them: the real dataplane, each peer-mapping mechanism, each encapsulation, the
drivers, their refusing stand-ins and the tests' fakes have exactly the
protocol's methods, with its signatures; and the IPAM and the network driver
know each other only through those protocols."""
import ast
import inspect
import typing

import pytest

from fan_driver.refusal import _RefusingIpam, _RefusingNetwork
from fan_driver.cli import peer_mappings
from fan_driver.config import PEER_MAPPINGS
from fan_driver.dataplane import LinuxDataplane
from fan_driver.dataplane.base import Dataplane, PeerMapping
from fan_driver.dataplane.encap import ENCAPS
from fan_driver.dataplane.encap.base import Encapsulation
from fan_driver.dataplane.mapping.ebpf import EbpfMapping
from fan_driver.dataplane.mapping.kernel_fanmap import KernelMapping
from fan_driver.dataplane.mapping.routes import RoutesMapping
from fan_driver.drivers import IpamDriverApi, NetworkDriverApi, NetworkRemoval
from fan_driver import ipam, network
from fan_driver.ipam import IpamDriver
from fan_driver.network import NetworkDriver
from fan_driver.publishing import PortPublisher
from fan_driver.reconcile import Reconciler
from fan_driver.server import routes

from tests.unit.fakes import FakeDataplane

IMPLEMENTATIONS = [(Dataplane, LinuxDataplane), (Dataplane, FakeDataplane),
                   (PeerMapping, EbpfMapping), (PeerMapping, KernelMapping),
                   (PeerMapping, RoutesMapping), (IpamDriverApi, IpamDriver),
                   (NetworkDriverApi, _RefusingNetwork), (IpamDriverApi, _RefusingIpam),
                   *((Encapsulation, type(e)) for e in ENCAPS.values())]
# The network driver implements two protocols.
NETWORK_DRIVER_PROTOCOLS = (NetworkDriverApi, NetworkRemoval)
# Parts without a protocol of their own, each with one caller: what it calls.
PARTS = {Reconciler: {"restore"},                  # the CLI, once at start
         PortPublisher: {"publish", "revoke"}}     # the network driver
# The modules of the network driver, which the IPAM must not import.
NETWORK_SIDE = {"network", "publishing", "reconcile", "lookup"}


def public_methods(cls) -> dict:
    return {name: member for name, member in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_")}


@pytest.mark.parametrize("protocol,cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_an_implementation_has_exactly_the_protocols_methods(protocol, cls):
    assert protocol in cls.__mro__
    assert not inspect.isabstract(cls), f"{cls.__name__} lacks {cls.__abstractmethods__}"
    assert set(public_methods(cls)) == set(public_methods(protocol))


@pytest.mark.parametrize("protocol,cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_an_implementation_takes_the_protocols_arguments(protocol, cls):
    for name, declared in public_methods(protocol).items():
        method = public_methods(cls)[name]
        assert list(inspect.signature(method).parameters) == list(
            inspect.signature(declared).parameters), f"{cls.__name__}.{name}"
        assert inspect.iscoroutinefunction(method) == inspect.iscoroutinefunction(declared)


def test_the_network_driver_has_exactly_its_protocols_methods():
    assert set(NETWORK_DRIVER_PROTOCOLS) <= set(NetworkDriver.__mro__)
    assert not inspect.isabstract(NetworkDriver), NetworkDriver.__abstractmethods__
    declared = set().union(*(public_methods(p) for p in NETWORK_DRIVER_PROTOCOLS))
    assert set(public_methods(NetworkDriver)) == declared
    for protocol in NETWORK_DRIVER_PROTOCOLS:
        test_an_implementation_takes_the_protocols_arguments(protocol, NetworkDriver)


@pytest.mark.parametrize("cls", PARTS, ids=lambda c: c.__name__)
def test_a_part_has_only_the_methods_its_caller_calls(cls):
    assert set(public_methods(cls)) == PARTS[cls]


def imported_modules(module) -> dict:
    """{the fan_driver module a `from .x import ...` names: the names imported}."""
    tree = ast.parse(inspect.getsource(module))
    return {node.module: {alias.name for alias in node.names} for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1}


def test_the_ipam_reaches_the_network_driver_only_as_network_removal():
    assert not NETWORK_SIDE & set(imported_modules(ipam))
    hints = typing.get_type_hints(IpamDriver.__init__)
    assert hints["network"] == typing.Optional[NetworkRemoval]
    tree = ast.parse(inspect.getsource(IpamDriver))
    called = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
              and isinstance(node.value, ast.Attribute) and node.value.attr == "network"}
    assert called == set(public_methods(NetworkRemoval))


def test_the_network_driver_takes_from_the_ipam_no_class():
    taken = imported_modules(network).get("ipam", set())
    assert not [name for name in taken if inspect.isclass(getattr(ipam, name))]


def test_the_drivers_protocols_are_exactly_what_the_server_routes_to():
    network, ipam = _RefusingNetwork("no"), _RefusingIpam("no")
    called = [route.call for route in routes(network, ipam).values()]
    assert {c.__name__ for c in called if getattr(c, "__self__", None) is network} == set(
        public_methods(NetworkDriverApi))
    assert {c.__name__ for c in called if getattr(c, "__self__", None) is ipam} == set(
        public_methods(IpamDriverApi))


def test_a_refusing_driver_with_a_renamed_method_cannot_be_built():
    methods = {name: f for name, f in vars(_RefusingNetwork).items() if name != "join"}
    methods["join_endpoint"] = _RefusingNetwork.join
    renamed = type("Renamed", (_RefusingNetwork.__bases__), methods)
    with pytest.raises(TypeError, match="join"):
        renamed("no")


def test_a_fake_with_a_renamed_method_cannot_be_built():
    methods = {name: f for name, f in vars(FakeDataplane).items() if name != "attach"}
    methods["attach_endpoint"] = FakeDataplane.attach      # the old name of a renamed method
    renamed = type("Renamed", (Dataplane,), methods)
    with pytest.raises(TypeError, match="attach"):
        renamed()


def test_the_wiring_builds_one_mechanism_per_mapping_choose_can_pick():
    mappings = peer_mappings()
    assert set(mappings) == set(PEER_MAPPINGS)
    assert all(name == mapping.name for name, mapping in mappings.items())
    assert peer_mappings()["ebpf"] is not mappings["ebpf"]    # built on each call, not at import
