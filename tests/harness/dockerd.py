"""A real dockerd inside one lab host's network namespace.

Each Dockerd has its own temporary directory holding data-root, exec-root,
pidfile, API socket, daemon.json, CLI config and log, and its own cgroup parent
(`/<tmpdir name>` in every hierarchy), so it shares nothing with another
dockerd or with a docker of the real host.

It is started as `ip netns exec <ns> sh -c '<mounts>; exec dockerd ...'`.
`ip netns exec` gives the child its own mount namespace (a slave of the host's,
so nothing mounted there shows on the host) and remounts /sys for the network
namespace, which hides /sys/fs/cgroup ("Devices cgroup isn't mounted"). The
script therefore first mounts again what the host has under /sys/fs/cgroup (read
from /proc/self/mountinfo, so cgroup v1, hybrid and v2 all work), then a tmpfs
over /run: that hides /run/docker/plugins (a fan.sock of a plugin on the real
host is never discovered) and /run/containerd/containerd.sock (dockerd 20.10
would use a system containerd it finds there instead of starting its own).
Container mounts (overlay, netns bind mounts) live and die in that mount
namespace too.

Plugin discovery: /etc/netns/<ns>/docker/plugins/<name>.spec is what dockerd
sees as /etc/docker/plugins/<name>.spec. The directory must exist before dockerd
starts (the bind mount is made at `ip netns exec` time); files written into it
later are seen, because dockerd looks plugins up on demand.

Flavours (FLAVOURS): `host` runs the machine's own dockerd (Debian's docker.io,
whatever its version); `sid` runs Debian unstable's from the root that
harness.sidroot caches, pivoted into as the root of the same mount namespace
after: the root bound onto itself (containerd finds its data
in mountinfo only under a mount point); /sys (with the cgroups rebuilt), a
fresh proc, /dev and the fresh /run bound in; the temporary directory bound at
the same path (data-root, sockets, the plugin's socket and state all live
there); the host's /etc/netns/<ns>/docker/plugins over the root's
/etc/docker/plugins; then the root made read-only, so two daemons sharing it
cannot collide through it. The CLI (and compose) are the root's own, run on
the host.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from . import unixhttp
from .images import find_static_busybox
from .netlab import Host, shell_join
from .sidroot import SidRoot, sid_root
from .procs import (ChildProcess, CommandError, cmdline, env_with_sbin, kill_pids,
                    mountinfo, ns_inode, pids_in_ns, remove_cgroup_trees, run_cmd, stop_popen,
                    tail, wait_answering, with_descendants)

CGROUP_ROOT = "/sys/fs/cgroup"
DEFAULT_NETWORKS = {"bridge", "host", "none"}
# dockerd log lines worth a failed test's report: warnings and errors (a
# managed plugin's output arrives as level=error, its debug lines among them),
# and the daemon's own milestones around them.
NOTEWORTHY = re.compile(r'level=(warning|fatal)|level=error msg="(?!DEBUG )'
                        r'|msg="(Starting up|Processing signal|Loading containers|'
                        r'Daemon shutdown complete|Container failed to exit)')
# flavour -> what it is, for test output
FLAVOURS = {"host": "this machine's docker.io", "sid": "Debian unstable's docker.io"}


def docker_cli_path() -> str:
    """The docker CLI: $FANLAB_DOCKER_CLI, else the one packaged with dockerd
    (/usr/bin/docker from docker.io, same version), else the first on PATH."""
    for candidate in (os.environ.get("FANLAB_DOCKER_CLI"), "/usr/bin/docker",
                      shutil.which("docker", path=env_with_sbin()["PATH"])):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError("no docker CLI found (apt-get install docker.io)")


def cgroup_mount_commands() -> list[str]:
    """Shell commands that rebuild the host's /sys/fs/cgroup in a fresh /sys."""
    cmds = []
    for m in mountinfo():
        mp = m["mountpoint"]
        if mp != CGROUP_ROOT and not mp.startswith(CGROUP_ROOT + "/"):
            continue
        ro = ["ro"] if "ro" in m["mount_opts"] else []
        if m["fstype"] == "tmpfs":          # v1 / hybrid: a tmpfs of mountpoints
            cmds.append(shell_join(["mount", "-t", "tmpfs", "-o", ",".join(["mode=755"] + ro),
                                    "cgroup_root", mp]))
        elif m["fstype"] in ("cgroup", "cgroup2"):
            opts = [o for o in m["super_opts"].split(",") if o not in ("rw", "ro", "")] + ro
            cmds.append(shell_join(["mkdir", "-p", mp]))
            cmds.append(shell_join(["mount", "-t", m["fstype"], "-o", ",".join(opts or ["rw"]),
                                    m["source"], mp]))
    # systemd hosts link e.g. cpu -> cpu,cpuacct inside that tmpfs.
    if os.path.isdir(CGROUP_ROOT) and os.path.ismount(CGROUP_ROOT):
        for entry in sorted(os.listdir(CGROUP_ROOT)):
            path = os.path.join(CGROUP_ROOT, entry)
            if os.path.islink(path):
                cmds.append(shell_join(["ln", "-sfn", os.readlink(path), path]))
    return cmds


class DockerdError(RuntimeError):
    pass


class Dockerd(ChildProcess):
    """One dockerd in `host`'s namespace (one per host: each makes its docker0).

    start() / stop() / kill() / restart() / close(); .client (docker SDK);
    .cli(*args) runs the docker CLI against it from the host namespace.
    """

    def __init__(self, host: Host, extra_args: tuple[str, ...] = (), debug: bool = True,
                 daemon_config: dict | None = None, start_timeout: float = 90,
                 flavour: str = "host", root: SidRoot | None = None):
        if flavour not in FLAVOURS:
            raise ValueError(f"unknown dockerd flavour {flavour!r}: one of {sorted(FLAVOURS)}")
        self.flavour = flavour
        # raises SidRootUnavailable before anything is made
        self.root = (root or sid_root()) if flavour == "sid" else None
        self.version: str | None = None          # the daemon's, read at start()
        self.host = host
        short = host.name.removeprefix("fanlab-")
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"fanlab-dockerd-{short}-"))
        self.data_root = self.tmpdir / "data"
        self.exec_root = self.tmpdir / "exec"
        self.pidfile = self.tmpdir / "docker.pid"
        self.socket = self.tmpdir / "docker.sock"
        self.config_file = self.tmpdir / "daemon.json"
        self.cli_config = self.tmpdir / "cli"
        self.log_path = self.tmpdir / "dockerd.log"
        self.cgroup_parent = f"/{self.tmpdir.name}"
        self.base_url = f"unix://{self.socket}"
        self.extra_args = tuple(extra_args)
        self.debug = debug
        self.daemon_config = dict(daemon_config or {})
        self.start_timeout = start_timeout
        self.start_seconds: float | None = None   # how long the last start() took
        self.proc: subprocess.Popen | None = None
        self._mntns: str | None = None
        self._client = None
        self._log = None
        self._closed = False
        self.cli_config.mkdir()
        self.cli_path = docker_cli_path() if self.root is None else str(self.root.cli)
        if self.root is not None:
            plugins = self.cli_config / "cli-plugins"     # `docker compose`
            plugins.mkdir()
            (plugins / "docker-compose").symlink_to(self.root.compose)
        # Safety net: the lab stops us before deleting the namespace.
        host.lab.add_cleanup(self.close, host)

    # -- process ------------------------------------------------------------------

    @property
    def label(self) -> str:
        """e.g. `docker-sid 28.5.2`, for test output."""
        return f"docker-{self.flavour} {self.version or '(not started)'}"

    def command(self) -> list[str]:
        cmd = ["dockerd", "--data-root", self.data_root, "--exec-root", self.exec_root,
               "--pidfile", self.pidfile, "-H", self.base_url,
               "--config-file", self.config_file, "--iptables=true",
               "--cgroup-parent", self.cgroup_parent]
        if self.debug:
            cmd.append("--debug")
        return [str(c) for c in [*cmd, *self.extra_args]]

    def script(self) -> str:
        lines = ["set -e", *cgroup_mount_commands(),
                 "mount -t tmpfs -o mode=755 fanlab-run /run",
                 "mkdir -p /run/docker/plugins /run/lock"]
        if self.root is None:
            return "\n".join([*lines, "exec " + shell_join(self.command())])
        root = str(self.root.path)
        tmp = str(Path(tempfile.gettempdir()).resolve())
        binds = [(["--rbind", "/sys"], "sys"), (["--rbind", "/dev"], "dev"),
                 (["--rbind", "/run"], "run"), (["--bind", tmp], tmp.lstrip("/")),
                 (["--bind", str(self.host.etc_dir / "docker" / "plugins")],
                  "etc/docker/plugins")]
        lines += [shell_join(["mount", "--bind", root, root]),
                  shell_join(["mount", "-t", "proc", "proc", f"{root}/proc"])]
        for how, where in binds:
            lines += [shell_join(["mkdir", "-p", f"{root}/{where}"]),   # exist but for $TMPDIR
                      shell_join(["mount", *how, f"{root}/{where}"])]
        # read-only from here on: only the mounts above are writable
        lines.append(shell_join(["mount", "-o", "remount,bind,ro", root]))
        # The root becomes the mount namespace's own (pivot_root, not a bare
        # chroot): in a chroot runc cannot pivot_root either and falls back to
        # chroot, and then `docker exec` lands in the namespace's real root
        # (this machine's /) instead of the container's filesystem.
        old_root = "run/fanlab-old-root"
        lines += [shell_join(["mkdir", "-p", f"{root}/{old_root}"]),
                  shell_join(["cd", root]),
                  shell_join(["pivot_root", ".", old_root]),
                  # the root has no umount: the host's static busybox, from the old root
                  "exec chroot . sh -c " + shlex.quote(
                      f"/{old_root}{find_static_busybox()} umount -l /{old_root} && "
                      f"rmdir /{old_root} && exec " + shell_join(self.command()))]
        return "\n".join(lines)

    def start(self) -> "Dockerd":
        if self._closed:
            raise DockerdError("this Dockerd was closed")
        if self.running:
            return self
        (self.host.etc_dir / "docker" / "plugins").mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(json.dumps(self.daemon_config))
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n==== fanlab: starting dockerd at {time.ctime()} ====\n".encode())
        self._log.flush()
        started = time.monotonic()
        # ip netns exec and sh both exec: proc.pid is dockerd's PID.
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.host.name, "sh", "-c", self.script()],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=env_with_sbin({"DOCKER_CONFIG": str(self.cli_config)}), start_new_session=True)
        try:
            self.wait_ready(self.start_timeout)
        except BaseException:
            self.stop()
            raise
        self._mntns = ns_inode(self.proc.pid, "mnt")
        self.start_seconds = time.monotonic() - started
        self.version = self._server_version()
        return self

    def _server_version(self) -> str:
        status, body = unixhttp.request(self.socket, "GET", "/version", timeout=10)
        if status != 200:
            raise DockerdError(f"GET /version: HTTP {status}: {body}")
        return json.loads(body)["Version"]

    def wait_ready(self, timeout: float = 90) -> None:
        """Poll the API socket until GET /_ping says OK."""
        why = wait_answering(self.proc, lambda: unixhttp.request(self.socket, "GET", "/_ping",
                                                                 timeout=5), timeout, 0.1)
        if why:
            raise DockerdError(f"dockerd in {self.host.name}: {why}; log {self.log_path}:\n"
                               f"{self.log_tail()}")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM dockerd by PID (SIGKILL after `timeout`), then end whatever it
        left in its mount namespace (containerd, shims, their containers)."""
        self._drop_client()
        if self.proc is not None:
            stop_popen(self.proc, timeout=timeout)
        self._kill_leftovers()
        # After a crash these name dead PIDs; if such a PID is still a zombie
        # (nobody reaps orphans quickly without an init system), the next dockerd
        # would take it for a running daemon or containerd and wait for it.
        for stale in (self.pidfile, self.exec_root / "containerd" / "containerd.pid"):
            stale.unlink(missing_ok=True)
        if self._log:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """A crash: SIGKILL dockerd, then clean up like stop()."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, 9)
        self.stop()

    def restart(self, timeout: float = 30) -> "Dockerd":
        self.stop(timeout)
        return self.start()

    def _kill_leftovers(self) -> None:
        if self._mntns is None:
            return
        # Shims re-parent to init, so find them by mount namespace; a container's
        # own processes are their descendants. The command line must name our
        # directory too, in case the namespace's inode number was reused.
        ours = [pid for pid in pids_in_ns("mnt", self._mntns)
                if str(self.tmpdir) in cmdline(pid)]
        left = with_descendants(ours)
        if left:
            # Orphans of a dead daemon (a container's PID 1 ignores SIGTERM).
            kill_pids(left, timeout=0)
        self._mntns = None

    # -- talking to it --------------------------------------------------------------

    @property
    def client(self):
        """A docker SDK DockerClient on this daemon (made again after a restart)."""
        if self._client is None:
            import docker
            self._client = docker.DockerClient(base_url=self.base_url, version="auto",
                                               timeout=120)
        return self._client

    def _drop_client(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None

    def cli(self, *args: str, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess:
        """`docker -H unix://... <args>`; CompletedProcess with text output."""
        return run_cmd([self.cli_path, "-H", self.base_url, *args], check=check,
                       timeout=timeout, input=input,
                       env=env_with_sbin({"DOCKER_CONFIG": str(self.cli_config)}))

    def compose(self, project_dir: str | Path, *args: str, check: bool = True,
                timeout: float = 180) -> subprocess.CompletedProcess:
        """`docker compose <args>` in project_dir against this daemon, with Debian
        unstable's docker-compose 2.x whatever the daemon's version (raises
        SidRootUnavailable when that root cannot be had)."""
        root = self.root or sid_root()
        return run_cmd([root.compose, *args], check=check, timeout=timeout, cwd=project_dir,
                       env=env_with_sbin({"DOCKER_HOST": self.base_url,
                                          "DOCKER_CONFIG": str(self.cli_config)}))

    def failure_log(self) -> str:
        """Its warnings and errors, among them a failed container start, and its
        plugins' own lines but their debug ones: the debug lines of its
        iptables calls would bury them."""
        return tail(self.log_path, 80, keep=lambda line: bool(NOTEWORTHY.search(line)))

    def reset(self) -> None:
        """Remove every container, volume and non-default network (images stay)."""
        ids = self.cli("ps", "-aq", timeout=60).stdout.split()
        if ids:
            self.cli("rm", "-f", "-v", *ids, check=False, timeout=180)
        names = self.cli("network", "ls", "--format", "{{.Name}}", timeout=60).stdout.split()
        for name in names:
            if name not in DEFAULT_NETWORKS:
                # A fan network whose plugin is gone takes ~15 s per call to fail.
                self.cli("network", "rm", name, check=False, timeout=90)
        volumes = self.cli("volume", "ls", "-q", timeout=60).stdout.split()
        if volumes:
            self.cli("volume", "rm", "-f", *volumes, check=False, timeout=60)

    # -- teardown -------------------------------------------------------------------

    def close(self) -> None:
        """reset() if running, stop(), unmount leftovers, remove our cgroups and
        the temporary directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        errors = []
        if self.running:
            try:
                self.reset()
            except (CommandError, subprocess.TimeoutExpired) as exc:
                errors.append(f"reset: {exc}")
        self.stop()
        self._unmount_leftovers()
        self._remove_cgroups()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        if self.tmpdir.exists():
            errors.append(f"could not remove {self.tmpdir}")
        if errors:
            raise DockerdError("; ".join(errors))

    def _unmount_leftovers(self) -> None:
        # Normally none: dockerd's mounts die with its mount namespace.
        prefix = str(self.tmpdir) + "/"
        mounts = [m["mountpoint"] for m in mountinfo()
                  if m["mountpoint"].startswith(prefix)]
        for mp in sorted(mounts, key=len, reverse=True):
            if run_cmd(["umount", mp], check=False).returncode != 0:
                run_cmd(["umount", "-l", mp], check=False)

    def _remove_cgroups(self) -> None:
        remove_cgroup_trees(self.cgroup_parent.lstrip("/"))

    def __repr__(self) -> str:
        return (f"Dockerd({self.label}, host={self.host.name}, pid={self.pid}, "
                f"socket={self.socket})")


def docker_bg(dockerd, *args) -> subprocess.Popen:
    """The docker CLI in the background (it blocks while dockerd retries the plugin)."""
    return subprocess.Popen([dockerd.cli_path, "-H", dockerd.base_url, *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env_with_sbin({"DOCKER_CONFIG": str(dockerd.cli_config)}))
