"""The benchmark's lab: two fan hosts with their own dockerd and plugin on one
underlay switch, an outside gateway, and a third namespace for a plugin driven
directly (no dockerd) by the API benchmark. Built on tests/harness.

Addresses: both fan hosts are in 172.30.0.0/24 so that the per-peer routes
mapping can be measured on the data path over a /24 underlay (253 peers,
programmed in a second) as well as over the usual /16.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Optional

from fan_driver.fanmap import FanMap
from fan_driver.host import KERNEL_FAN_VERSION
from tests.harness import Lab, PluginProcess, missing_requirements, plugin_available
from tests.harness.fanhosts import FanHost, start_host
from tests.harness.procs import env_with_sbin, run_cmd

REPO = Path(__file__).resolve().parents[1]

PREFIX = "fanlab-bench-"
HOSTS = {"h28": "172.30.0.28/16", "h59": "172.30.0.59/16"}
API_HOST = ("api", "172.30.0.77/16")
OUTSIDE = "172.30.255.254/16"
KERNEL_FAN = Path(KERNEL_FAN_VERSION)   # Ubuntu's Fan patch


def requirements_missing() -> list[str]:
    """What keeps the benchmark from running here, in words."""
    missing = missing_requirements()
    for tool in ("iperf3", "nsenter", "bridge", "tc"):
        if not shutil.which(tool, path=env_with_sbin()["PATH"]):
            missing.append(f"`{tool}` on PATH")
    ok, why = plugin_available()
    if not ok:
        missing.append(f"the fan plugin ({why})")
    return missing


class BenchLab:
    """Context manager: the lab, its dockerds and plugins; everything removed at exit."""

    def __init__(self, log=print):
        self.log = log
        self.lab: Optional[Lab] = None
        self.hosts: dict[str, FanHost] = {}
        self.api_host = None
        self._workdirs: list[Path] = []
        self.setup_seconds: dict[str, float] = {}

    def __enter__(self) -> "BenchLab":
        started = time.monotonic()
        self.lab = Lab(prefix=PREFIX)
        try:
            self.api_host = self.lab.add_host(*API_HOST)
            self.lab.add_outside(OUTSIDE)
            self.setup_seconds["lab"] = time.monotonic() - started
            for name, address in HOSTS.items():
                t0 = time.monotonic()
                self.hosts[name] = start_host(self.lab, name, address, self._workdirs, quiet=True)
                self.setup_seconds[f"dockerd+plugin {name}"] = time.monotonic() - t0
        except BaseException:
            self.close()
            raise
        return self

    def workdir(self, tag: str) -> Path:
        work = Path(tempfile.mkdtemp(prefix=f"fanlab-bench-{tag}-"))
        self._workdirs.append(work)
        return work

    def plugin(self, host, tag: str) -> PluginProcess:
        work = self.workdir(tag)
        # At the level a user runs it: the harness's debug log costs CPU per request.
        return PluginProcess(host, socket_path=work / "fan.sock", state_dir=work / "state",
                             log_path=work / "plugin.log", log_level="info")

    def close(self) -> None:
        try:
            if self.lab is not None:
                # dockerd before its plugin: its reset removes fan networks.
                for h in self.hosts.values():
                    try:
                        h.dockerd.close()
                    except Exception as exc:   # keep tearing down
                        self.log(f"warning: closing dockerd of {h.name}: {exc}")
                    h.plugin.close()
                self.lab.close()
        finally:
            self.lab = None
            for work in self._workdirs:
                shutil.rmtree(work, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.close()


def peers_of(underlay: str) -> int:
    return IPv4Network(underlay).num_addresses - 3   # network, broadcast and this host


def last_peer_probe(h: FanHost, underlay: str, overlay: str) -> str:
    """An address in the slice of the last peer that mapping=routes programs
    (peers go in address order, each as neighbour, FDB entry, then route)."""
    fan = FanMap(IPv4Network(overlay), IPv4Network(underlay))
    net = IPv4Network(underlay)
    last = net.broadcast_address - 1
    if last == IPv4Address(h.ip):
        last -= 1
    return str(fan.slice_for(last).network_address + 2)


def wait_programmed(h: FanHost, underlay: str, overlay: str, timeout: float) -> None:
    """Until the kernel routes the last peer's slice through a fanr- device."""
    probe = last_peer_probe(h, underlay, overlay)
    # A lookup is cheap, but do not compete with the programming for long waits.
    interval = 0.05 if peers_of(underlay) < 5000 else 0.5
    deadline = time.monotonic() + timeout
    while "dev fanr-" not in run_cmd(["ip", "-n", h.host.name, "route", "get", probe],
                                     check=False).stdout:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{h.name}: peers not programmed after {timeout:.0f} s")
        time.sleep(interval)


def count_lines(cmd: list) -> int:
    return len([line for line in run_cmd(cmd, timeout=600).stdout.splitlines() if line.strip()])
