"""Run fan_driver code inside a network namespace the test created: a fresh
process in it (sockets, threads and all), with this worktree's package."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRELUDE = """
import asyncio, json, sys
from ipaddress import IPv4Address, IPv4Network
from pyroute2 import AsyncIPRoute
from fan_driver.dataplane.netlink import Links

async def body(links):
{body}

async def main():
    async with AsyncIPRoute() as ipr:
        result = await body(Links(ipr))
    print(json.dumps(result))

asyncio.run(main())
"""


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(cmd)}: {result.stderr.strip()}")
    return result


def run_in(ns: str, body: str, setup: str = "", without_cap: str = ""):
    """The JSON that `body` (the inside of `async def body(links)`) returns,
    run in namespace `ns`, after module-level `setup`; without the capability
    `without_cap` (e.g. "net_admin") if given."""
    code = setup + "\n" + PRELUDE.format(body=textwrap.indent(textwrap.dedent(body), "    "))
    prefix = ["setpriv", f"--bounding-set=-{without_cap}"] if without_cap else []
    result = subprocess.run(["ip", "netns", "exec", ns, *prefix, sys.executable, "-c", code],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": REPO})
    if result.returncode:
        raise AssertionError(f"in {ns}: {result.stderr.strip()[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


class Underlay:
    """A namespace whose eth0 (a veth; its peer stays inside) holds `address`."""

    def __init__(self, address: str = "172.30.0.28/16"):
        self.ns = f"fant-{uuid.uuid4().hex[:8]}"
        sh("ip", "netns", "add", self.ns)
        try:
            self.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
            self.ip("addr", "add", address, "dev", "eth0")
            for dev in ("lo", "eth0", "eth1"):
                self.ip("link", "set", dev, "up")
        except BaseException:
            self.close()
            raise

    def ip(self, *args: str, check: bool = True) -> str:
        return sh("ip", "-n", self.ns, *args, check=check).stdout

    def count(self, *args: str) -> int:
        return len([line for line in self.ip(*args, check=False).splitlines() if line.strip()])

    def skip_without_nexthops(self) -> None:
        if sh("ip", "-n", self.ns, "nexthop", "show", check=False).returncode:
            pytest.skip("this kernel has no nexthop objects (Linux 5.3+)")

    def close(self) -> None:
        sh("ip", "netns", "del", self.ns, check=False)
        assert self.ns not in sh("ip", "netns", "list").stdout
