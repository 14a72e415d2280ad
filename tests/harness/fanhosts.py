"""Fan hosts for multi-host tests: a lab host with its own plugin process and a
dockerd of the session daemon's flavour, on which every test runs the same
`docker network create`."""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .dockerd import Dockerd
from .images import ensure_busybox
from .plugin import PluginProcess

CREATE = ["network", "create", "-d", "fan", "--ipam-driver", "fan", "--subnet", "250.0.0.0/8"]


@dataclass
class FanHost:
    name: str
    host: object
    dockerd: Dockerd

    @property
    def container(self) -> str:
        return f"fan-on-{self.name}"

    def run_container(self, net: str = "fan") -> str:
        self.dockerd.cli("run", "-d", "--name", self.container, "--net", net,
                         "busybox", "sleep", "3600")
        out = self.dockerd.cli("inspect", self.container).stdout
        return json.loads(out)[0]["NetworkSettings"]["Networks"][net]["IPAddress"]

    def exec(self, *cmd, check=True):
        return self.dockerd.cli("exec", self.container, *cmd, check=check)

    def kernel_objects(self) -> dict:
        run = self.host.run
        return {
            "routes": len(run(["ip", "route", "show", "table", "all"]).stdout.splitlines()),
            "permanent neighbours": len(run(["ip", "neigh", "show", "nud", "permanent"])
                                        .stdout.splitlines()),
            "fdb entries on fan-vxlan": len(run(["bridge", "fdb", "show", "dev", "fan-vxlan"])
                                            .stdout.splitlines()),
        }


def start_host(lab, name, address, workdirs, flavour):
    host = lab.add_host(name, address)
    work = Path(tempfile.mkdtemp(prefix=f"fanlab-{name}-"))
    workdirs.append(work)
    plugin = PluginProcess(host, socket_path=work / "fan.sock", state_dir=work / "state",
                           log_path=work / "plugin.log")
    plugin.start()
    dockerd = Dockerd(host, flavour=flavour).start()     # the session daemon's version
    ensure_busybox(dockerd)
    return FanHost(name, host, dockerd)
