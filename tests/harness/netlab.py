"""An underlay made of network namespaces: one "switch" namespace holding a
Linux bridge, hosts plugged into it by veth pairs, and an "outside" host that is
every host's default gateway (the address containers reach through NAT).

Nothing here touches the real host's network: every link is created directly
inside a namespace of ours (`ip -n`), and the outside namespace does not
forward, so no packet can leave the lab. All names start with the lab's prefix
(`fanlab-` by default). A lock file per prefix serialises two test runs on one
machine instead of letting them tear down each other's namespaces.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Callable, Sequence

from .procs import (cmdline, env_with_sbin, kill_pids, pid_alive, remove_cgroup_trees, run_cmd,
                    with_descendants)

NETNS_ETC = Path("/etc/netns")
NETNS_RUN = Path("/run/netns")
LOCK_DIR = Path("/run/lock") if Path("/run/lock").is_dir() else Path("/tmp")
BRIDGE = "br0"


def busybox_path() -> str:
    for path in ("/bin/busybox", "/usr/bin/busybox"):
        if os.access(path, os.X_OK):
            return path
    raise FileNotFoundError("busybox not found (apt-get install busybox-static)")


def remove_stale_tmpdirs(argvs) -> None:
    """After killing what a dead test run left in a namespace: remove the
    `<tmp>/fanlab-*` directories named on their command lines (a dockerd's
    data-root, a plugin's socket dir) and the cgroups named after them."""
    tmp = Path(tempfile.gettempdir())
    tops = set()
    for argv in argvs:
        for word in argv.replace("=", " ").split():
            path = Path(word.removeprefix("unix://"))
            if path.is_absolute() and path.parent != path and tmp in path.parents:
                top = tmp / path.relative_to(tmp).parts[0]
                if top.name.startswith("fanlab-"):
                    tops.add(top)
    for top in tops:
        shutil.rmtree(top, ignore_errors=True)
        remove_cgroup_trees(top.name)


def private_prefix(tag: str = "") -> str:
    """A lab prefix owned by this process: `fanlab-p<pid>-<tag>-`. Namespaces
    with such a prefix whose process is gone are purged when any Lab is made."""
    return f"fanlab-p{os.getpid()}-{tag}-" if tag else f"fanlab-p{os.getpid()}-"


_PRIVATE = re.compile(r"^fanlab-p(\d+)-")


def netns_list() -> list[str]:
    """Named network namespaces: the entries of /run/netns, which is what
    `ip netns list` reads (that command can fail while another process is
    deleting a namespace)."""
    try:
        return sorted(os.listdir(NETNS_RUN))
    except FileNotFoundError:
        return []


def netns_pids(ns: str) -> list[int]:
    out = run_cmd(["ip", "netns", "pids", ns], check=False).stdout
    return [int(p) for p in out.split()]


class _PrefixLock:
    """flock on /run/lock/<prefix>lab.lock, unlinked on release. A waiter
    checks that the file it locked is still the one at the path."""

    def __init__(self, prefix: str):
        self.path = LOCK_DIR / f"{prefix}lab.lock"
        self.fd: int | None = None

    def acquire(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another test run holds {self.path} "
                                       f"(its namespaces are in use)") from None
                time.sleep(0.5)
                continue
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                os.write(fd, f"{os.getpid()}\n".encode())
                return
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


@dataclass
class Host:
    """A network namespace plugged into the lab switch by its `eth0`."""

    lab: "Lab" = field(repr=False)
    name: str                     # the netns name, e.g. fanlab-h28
    address: IPv4Interface
    mtu: int
    port: str = field(repr=False)  # the veth end on the switch

    @property
    def ip(self) -> IPv4Address:
        return self.address.ip

    @property
    def etc_dir(self) -> Path:
        """`ip netns exec` bind-mounts each entry of this directory over /etc/."""
        return NETNS_ETC / self.name

    def _argv(self, cmd: str | Sequence[str]) -> list[str]:
        # A string is a shell command line (pipes, redirections allowed).
        inner = ["sh", "-c", cmd] if isinstance(cmd, str) else [str(c) for c in cmd]
        return ["ip", "netns", "exec", self.name, *inner]

    def run(self, cmd: str | Sequence[str], check: bool = True, timeout: float = 60,
            input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run in this namespace; a CompletedProcess with text stdout/stderr.
        Raises CommandError (output included) if check and it fails."""
        return run_cmd(self._argv(cmd), check=check, timeout=timeout, input=input,
                       env=env_with_sbin(env))

    def popen(self, cmd: str | Sequence[str], env: dict | None = None,
              **kwargs) -> subprocess.Popen:
        """Start in this namespace; the caller ends it (kill() / wait()).
        Anything still running in the namespace is killed at lab.close()."""
        return subprocess.Popen(self._argv(cmd), env=env_with_sbin(env), **kwargs)

    def ip_cmd(self, *args: str, check: bool = True) -> str:
        return run_cmd(["ip", "-n", self.name, *args], check=check).stdout

    def ping(self, target, count: int = 1, timeout: float = 2, size: int | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
        """busybox ping (iputils' ping may be absent). Frames are never fragmented
        on the way through the switch: a bridge drops what exceeds a port's MTU."""
        cmd = [busybox_path(), "ping", "-c", str(count), "-W", str(int(timeout))]
        if size is not None:
            cmd += ["-s", str(size)]
        return self.run([*cmd, str(target)], check=check, timeout=count * timeout + 30)

    def enable_forwarding(self) -> None:
        self.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])

    def pids(self) -> list[int]:
        return netns_pids(self.name)

    def set_default_route(self, gateway: IPv4Address) -> None:
        self.ip_cmd("route", "replace", "default", "via", str(gateway), "dev", "eth0")

    def wipe_network(self) -> None:
        """What a reboot leaves of this host's network: lo and eth0 with its address
        and default route. Everything else (bridges, veths, tunnels, routes, every
        iptables rule and chain, forwarding) is gone."""
        for link in json.loads(self.run(["ip", "-j", "link", "show"]).stdout):
            if link["ifname"] not in ("lo", "eth0"):
                self.run(["ip", "link", "del", link["ifname"]], check=False)
        for table in ("filter", "nat", "mangle", "raw"):
            self.run(["iptables", "-t", table, "-F"])
            self.run(["iptables", "-t", table, "-X"])
        for chain in ("INPUT", "FORWARD", "OUTPUT"):
            self.run(["iptables", "-P", chain, "ACCEPT"])
        self.run(["sysctl", "-qw", "net.ipv4.ip_forward=0"])


class Lab:
    """Context manager: `with Lab() as lab: h = lab.add_host("h28", ...)`.

    Namespaces: `<prefix>sw` (the switch, bridge br0), `<prefix><name>` per host.
    close() runs registered cleanups (newest first), kills what still runs in
    the namespaces, deletes them and the /etc/netns/<ns> directories made here.
    """

    def __init__(self, prefix: str = "fanlab-", lock_timeout: float = 600):
        if not prefix.startswith("fanlab-"):
            raise ValueError("lab prefixes start with 'fanlab-'")
        self.prefix = prefix
        self.switch = f"{prefix}sw"
        self.hosts: dict[str, Host] = {}
        self.outside: Host | None = None
        self._namespaces: list[str] = []
        self._etc_dirs: list[Path] = []
        self._cleanups: list[tuple[Host | None, Callable[[], None]]] = []
        self._ports = 0
        self._purge_dead_private_labs()
        self._lock = _PrefixLock(prefix)
        started = time.monotonic()
        self._lock.acquire(lock_timeout)
        # Another test run on this machine with the same prefix makes us wait.
        self.lock_wait_seconds = time.monotonic() - started
        try:
            self._add_netns(self.switch)
            sw = ["ip", "-n", self.switch]
            run_cmd([*sw, "link", "add", BRIDGE, "type", "bridge", "stp_state", "0",
                     "mcast_snooping", "0"])
            run_cmd([*sw, "link", "set", BRIDGE, "up"])
        except BaseException:
            self.close()
            raise

    # -- building -------------------------------------------------------------

    def _add_netns(self, ns: str) -> None:
        if ns in netns_list():
            # Left by a run that died: we hold the prefix lock, so it is stale.
            self._remove_netns(ns, stale=True)
        run_cmd(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        run_cmd(["ip", "-n", ns, "link", "set", "lo", "up"])

    def add_host(self, name: str, address: str = "172.30.0.28/16", mtu: int = 1500) -> Host:
        """A namespace `<prefix><name>` whose eth0 (address, mtu) is a switch port."""
        if name in self.hosts or name == "sw":
            raise ValueError(f"host name {name!r} already used in this lab")
        host = self._plug(f"{self.prefix}{name}", IPv4Interface(address), mtu)
        self.hosts[name] = host
        if self.outside is not None and host.address.network == self.outside.address.network:
            host.set_default_route(self.outside.ip)
        return host

    def add_outside(self, address: str = "172.30.255.254/16", mtu: int = 1500) -> Host:
        """The namespace `<prefix>outside`: default gateway of every host (it
        does not forward, so what is sent to the "internet" stops there)."""
        if self.outside is not None:
            raise ValueError("this lab already has an outside namespace")
        self.outside = self._plug(f"{self.prefix}outside", IPv4Interface(address), mtu)
        for host in self.hosts.values():
            if host.address.network == self.outside.address.network:
                host.set_default_route(self.outside.ip)
        return self.outside

    def _plug(self, ns: str, address: IPv4Interface, mtu: int) -> Host:
        self._add_netns(ns)
        etc = NETNS_ETC / ns
        if etc.exists():
            shutil.rmtree(etc)      # stale, see _add_netns
        etc.mkdir(parents=True)
        self._etc_dirs.append(etc)
        self._ports += 1
        port = f"port{self._ports}"
        # Both ends are created inside our namespaces: nothing appears on the host.
        run_cmd(["ip", "-n", self.switch, "link", "add", port, "mtu", str(mtu), "type", "veth",
                 "peer", "name", "eth0", "netns", ns, "mtu", str(mtu)])
        run_cmd(["ip", "-n", self.switch, "link", "set", port, "master", BRIDGE, "up"])
        self._fit_bridge_mtu()
        run_cmd(["ip", "-n", ns, "addr", "add", str(address), "dev", "eth0"])
        run_cmd(["ip", "-n", ns, "link", "set", "eth0", "up"])
        return Host(self, ns, address, mtu, port)

    def _fit_bridge_mtu(self) -> None:
        # A bridge takes the smallest MTU of its ports unless set by hand; set it
        # to the largest so the switch itself never stands in the way of jumbo
        # frames (forwarding checks each egress port's own MTU).
        links = json.loads(run_cmd(["ip", "-n", self.switch, "-j", "link", "show",
                                    "master", BRIDGE]).stdout or "[]")
        if links:
            biggest = max(link["mtu"] for link in links)
            run_cmd(["ip", "-n", self.switch, "link", "set", BRIDGE, "mtu", str(biggest)])

    # -- using ------------------------------------------------------------------

    def host(self, name: str) -> Host:
        return self.hosts[name]

    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    def add_cleanup(self, fn: Callable[[], None], host: Host | None = None) -> None:
        """Run fn at close() (newest first), or at remove_host(host) if given,
        before the namespaces go."""
        self._cleanups.append((host, fn))

    def remove_host(self, name: str) -> None:
        """Take one host out of the lab: its cleanups (dockerd, plugin), its
        processes, its namespace (with its veth pair) and /etc/netns entry."""
        host = self.hosts.pop(name)
        errors = self._run_cleanups(lambda h: h is host)
        self._remove_netns(host.name)
        self._namespaces.remove(host.name)
        shutil.rmtree(host.etc_dir, ignore_errors=True)
        self._etc_dirs.remove(host.etc_dir)
        if errors:
            raise RuntimeError(f"removing host {name}: " + "; ".join(errors))

    def _run_cleanups(self, select) -> list[str]:
        errors = []
        for entry in reversed(list(self._cleanups)):
            host, fn = entry
            if select(host):
                self._cleanups.remove(entry)
                try:
                    fn()
                except Exception as exc:    # keep tearing down; report at the end
                    errors.append(f"{fn!r}: {exc}")
        return errors

    # -- tearing down -------------------------------------------------------------

    def _purge_dead_private_labs(self) -> None:
        for ns in netns_list():
            match = _PRIVATE.match(ns)
            if match and not pid_alive(int(match.group(1))):
                self._remove_netns(ns, stale=True)
                shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        for lock in LOCK_DIR.glob("fanlab-p*lab.lock"):
            match = _PRIVATE.match(lock.name)
            if match and not pid_alive(int(match.group(1))):
                lock.unlink(missing_ok=True)

    def _remove_netns(self, ns: str, stale: bool = False) -> None:
        # Processes keep a namespace alive after `ip netns del`: end them first,
        # with their descendants (a container under a shim has its own netns).
        pids = with_descendants(netns_pids(ns))
        argvs = [cmdline(pid) for pid in pids]
        kill_pids(pids)
        run_cmd(["ip", "netns", "del", ns], check=False)
        if stale:
            remove_stale_tmpdirs(argvs)

    def close(self) -> None:
        """Idempotent. Raises RuntimeError naming what could not be removed."""
        errors = self._run_cleanups(lambda host: True)
        ours = set(self._namespaces)
        for ns in reversed(self._namespaces):
            self._remove_netns(ns)
        self._namespaces.clear()
        for etc in self._etc_dirs:
            shutil.rmtree(etc, ignore_errors=True)
        self._etc_dirs.clear()
        try:
            # Ours, or left empty by a run that died; kept if anything is in it.
            NETNS_ETC.rmdir()
        except OSError:
            pass
        left = sorted(ours & set(netns_list()))
        if left:
            errors.append(f"namespaces left behind: {left}")
        self._lock.release()
        if errors:
            raise RuntimeError("lab teardown: " + "; ".join(errors))

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Lab(prefix={self.prefix!r}, hosts={list(self.hosts)})"


def shell_join(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(c)) for c in cmd)
