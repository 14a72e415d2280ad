"""Fan hosts: a lab host running its own plugin process (or the session's) and a
dockerd, on which every test or benchmark runs the same `docker network create`.
The multi-host tests and the benchmarks both build theirs with start_host."""
from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .dockerd import Dockerd
from .images import ensure_busybox
from .netlab import Host
from .plugin import PluginProcess

CREATE = ["network", "create", "-d", "fan", "--ipam-driver", "fan", "--subnet", "250.0.0.0/8"]


def netns_path(pid_or_name) -> str:
    """The network namespace file of a process (int) or a named namespace (str)."""
    if isinstance(pid_or_name, int):
        return f"/proc/{pid_or_name}/ns/net"
    return f"/run/netns/{pid_or_name}"


def in_netns(ns: str, cmd: list) -> list[str]:
    """`cmd` run in network namespace file `ns` only (nothing else changes)."""
    return ["nsenter", f"--net={ns}", *[str(c) for c in cmd]]


@dataclass
class FanHost:
    name: str
    host: Host
    dockerd: Dockerd
    plugin: PluginProcess | None = None     # None: the session's plugin serves it
    containers: dict = field(default_factory=dict)   # name -> (PID, address), of start_container

    @property
    def ip(self) -> str:
        return str(self.host.ip)

    @property
    def netns(self) -> str:
        return netns_path(self.host.name)

    def cli(self, *args, **kwargs) -> subprocess.CompletedProcess:
        return self.dockerd.cli(*args, **kwargs)

    def start_container(self, name: str, net: str = "fan") -> tuple[int, str]:
        """A busybox `sleep` on `net`: (its PID on this machine, its address)."""
        self.cli("run", "-d", "--name", name, "--net", net, "busybox", "sleep", "86400",
                 timeout=180)
        info = json.loads(self.cli("inspect", name).stdout)[0]
        found = (info["State"]["Pid"], info["NetworkSettings"]["Networks"][net]["IPAddress"])
        self.containers[name] = found
        return found

    def container_netns(self, name: str) -> str:
        return netns_path(self.containers[name][0])

    @property
    def container(self) -> str:
        """The one container of a multi-host test on this host."""
        return f"fan-on-{self.name}"

    def run_container(self, net: str = "fan") -> str:
        """The test's container (`container`) on `net`; its address."""
        return self.start_container(self.container, net)[1]

    def exec(self, *cmd, check=True):
        return self.cli("exec", self.container, *cmd, check=check)

    def kernel_objects(self) -> dict:
        run = self.host.run
        return {
            "routes": len(run(["ip", "route", "show", "table", "all"]).stdout.splitlines()),
            "permanent neighbours": len(run(["ip", "neigh", "show", "nud", "permanent"])
                                        .stdout.splitlines()),
            "fdb entries on fan-vxlan": len(run(["bridge", "fdb", "show", "dev", "fan-vxlan"])
                                            .stdout.splitlines()),
        }


def start_host(lab, name, address, workdirs, flavour="host", quiet=False) -> FanHost:
    """A new lab host with its own plugin and dockerd (`flavour`), busybox
    imported. quiet: the plugin logs at info and dockerd without --debug, as a
    user runs them (the benchmarks: debug logs cost CPU on every request)."""
    host = lab.add_host(name, address)
    work = Path(tempfile.mkdtemp(prefix=f"fanlab-{name}-"))
    workdirs.append(work)
    plugin = PluginProcess(host, socket_path=work / "fan.sock", state_dir=work / "state",
                           log_path=work / "plugin.log", log_level="info" if quiet else "debug")
    plugin.start()
    dockerd = Dockerd(host, flavour=flavour, debug=not quiet).start()
    ensure_busybox(dockerd)
    return FanHost(name, host, dockerd, plugin)
