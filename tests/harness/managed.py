"""The fan plugin as a Docker managed plugin, built by plugin/build.sh.

No image registry is reachable here, so the base image is made locally: a
Debian bookworm root filesystem with Python by mmdebstrap (cached under
/var/tmp/fanlab-base), imported with `docker import` and passed as the
Dockerfile's BASE_IMAGE; the package and its dependencies come as wheels built
on this host (build.sh --wheels), so the image build needs no network.

A plugin cannot be pushed anywhere either: other daemons get the one built
(plugin_dir, then install_plugin_dir: `docker plugin create` from the built
image's filesystem), which is what `docker plugin push` and `install` would
carry.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .images import import_tarball
from .netlab import Lab
from .procs import env_with_sbin, run_cmd

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "plugin" / "build.sh"
PLUGIN = "fan:latest"
IMAGE = "fanlab-fan-driver:latest"
BASE_IMAGE = "fanlab-debian-python:bookworm"

BASE_CACHE = Path("/var/tmp/fanlab-base")
MMDEBSTRAP = ["--variant=apt", "--include=python3,python3-venv,iptables,iproute2,ca-certificates,libbpf1",
              "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
              "--dpkgopt=path-exclude=/usr/share/locale/*",
              "--dpkgopt=path-exclude=/usr/share/info/*", "bookworm"]


def unavailable() -> str | None:
    """Why the managed plugin cannot be built here, or None."""
    if not shutil.which("mmdebstrap", path=env_with_sbin()["PATH"]):
        return ("the managed plugin's base image is built with mmdebstrap: "
                "apt-get install mmdebstrap")
    return None


def base_tarball() -> tuple[Path, float]:
    """The Debian base root filesystem, built once per recipe and machine and
    kept in /var/tmp (a lock keeps two test runs from building it together).
    Returns (tarball, seconds spent building it: 0 when cached)."""
    digest = hashlib.sha256(json.dumps(MMDEBSTRAP).encode()).hexdigest()[:12]
    BASE_CACHE.mkdir(parents=True, exist_ok=True)
    tarball = BASE_CACHE / f"bookworm-python-{digest}.tar"
    with open(BASE_CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():
            return tarball, 0.0
        for old in BASE_CACHE.glob("bookworm-python-*"):
            old.unlink()
        partial = BASE_CACHE / f"bookworm-python-{digest}.partial.tar"
        started = time.monotonic()
        run_cmd(["mmdebstrap", *MMDEBSTRAP, str(partial)], timeout=900)
        partial.rename(tarball)
        return tarball, time.monotonic() - started


def import_base(dockerd) -> tuple[float, float]:
    """The base image in `dockerd`: (seconds building the tarball, importing it)."""
    tarball, built = base_tarball()
    started = time.monotonic()
    import_tarball(dockerd, tarball, BASE_IMAGE, ['CMD ["python3"]'])
    return built, time.monotonic() - started


def build(dockerd, workdir: Path, *args: str) -> dict:
    """plugin/build.sh against `dockerd` (the base image imported); returns its
    step timings {step: seconds}."""
    env = env_with_sbin({"DOCKER": dockerd.cli_path, "DOCKER_HOST": dockerd.base_url,
                         "DOCKER_CONFIG": str(dockerd.cli_config), "TMPDIR": str(workdir)})
    result = run_cmd(["bash", str(BUILD), "--base", BASE_IMAGE, "--image", IMAGE, "--wheels",
                      *args], env=env, timeout=900, cwd=REPO)
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^build\.sh: ([a-z ]+): ([0-9.]+) s", result.stderr, re.M)}


def plugin_dir(dockerd, dest: Path) -> Path:
    """What `docker plugin create` takes, from the image build.sh built in
    `dockerd`: its filesystem as rootfs/ and plugin/config.json."""
    (dest / "rootfs").mkdir(parents=True)
    cid = dockerd.cli("create", IMAGE).stdout.strip()
    try:
        export = subprocess.Popen([dockerd.cli_path, "-H", dockerd.base_url, "export", cid],
                                  stdout=subprocess.PIPE,
                                  env=env_with_sbin({"DOCKER_CONFIG": str(dockerd.cli_config)}))
        untar = subprocess.run(["tar", "-x", "-C", str(dest / "rootfs")], stdin=export.stdout,
                               capture_output=True, text=True, timeout=300, check=False)
        export.stdout.close()
        if export.wait(timeout=60) != 0 or untar.returncode != 0:
            raise RuntimeError(f"docker export {cid} | tar -x: {untar.stderr}")
    finally:
        dockerd.cli("rm", cid, check=False)
    shutil.copy(REPO / "plugin" / "config.json", dest / "config.json")
    return dest


def install_plugin_dir(dockerd, directory: Path, state_dir: Path, *sets: str) -> None:
    """`docker plugin create` + set + enable, as build.sh does after its build."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    dockerd.cli("plugin", "create", PLUGIN, str(directory), timeout=300)
    dockerd.cli("plugin", "set", PLUGIN, f"state.source={state_dir}", *sets)
    dockerd.cli("plugin", "enable", PLUGIN, timeout=120)


@dataclass
class BuiltPlugin:
    """The plugin directory of the first build.sh run of a test session: later
    dockerds (whatever their version: the plugin does not depend on it) install
    it from here, as `docker plugin install` would from a registry, instead of
    building it again."""
    workdir: Path
    directory: Path | None = None

    def keep(self, dockerd) -> None:
        """Keep what build.sh has just built in `dockerd`, unless one is kept."""
        if self.directory is None:
            self.directory = plugin_dir(dockerd, self.workdir / "plugin")


def remove_plugins(dockerd) -> None:
    """Disable and remove every plugin of a running dockerd (teardown)."""
    for plugin in dockerd.cli("plugin", "ls", "-q", check=False).stdout.split():
        dockerd.cli("plugin", "disable", "-f", plugin, check=False)
        dockerd.cli("plugin", "rm", "-f", plugin, check=False)


def plugin_log(dockerd, lines: int = 30) -> str:
    """The plugin's own lines of a dockerd log (its stderr), without debug."""
    log = dockerd.log_path.read_text(errors="replace").splitlines()
    return "\n".join([line[:300] for line in log if "plugin=" in line and "msg=" in line
                      and "DEBUG" not in line][-lines:])


@contextmanager
def plugin_lab(prefix: str, lock_waits: list) -> Iterator[tuple[Lab, Path, list]]:
    """A lab of its own (namespaces named `prefix`...), a work directory and a
    list to put the lab's dockerds in; on the way out each running one is
    emptied and loses its plugins, then the lab (and with it the dockerds and
    their data-roots) and the work directory go."""
    lab = Lab(prefix=prefix)
    lock_waits.append(lab.lock_wait_seconds)
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    daemons: list = []
    try:
        yield lab, workdir, daemons
    finally:
        try:
            for dockerd in daemons:
                if dockerd.running:
                    dockerd.reset()
                    remove_plugins(dockerd)
        finally:
            lab.close()
            shutil.rmtree(workdir, ignore_errors=True)
