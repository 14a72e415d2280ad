"""Debian unstable's Docker (dockerd, CLI, compose) in a root filesystem made
with mmdebstrap, so the suite can run a current dockerd without touching the
host's packages.

The root is built once per recipe and machine and kept in
$FANLAB_CACHE (default /var/cache/fan-driver-tests) as `sid-<digest>/root`,
the digest taken over the recipe (suite, packages, options): a second run
finds it, a changed recipe builds a new one and removes the old. A lock keeps
two test runs from building it together. Delete the directory to pick up newer
unstable packages.

Daemons never write into it: harness.dockerd mounts it read-only in each
daemon's own mount namespace and binds per-daemon directories over it.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .procs import env_with_sbin, run_cmd

SUITE = "sid"
PACKAGES = ("docker.io", "containerd", "runc", "tini", "iptables", "iproute2",
            "ca-certificates", "docker-cli", "docker-compose")
# Unstable's Release file may be past its Valid-Until on the mirror (seen here).
OPTIONS = ("--variant=apt", '--aptopt=Acquire::Check-Valid-Until "false"',
           "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
           "--dpkgopt=path-exclude=/usr/share/locale/*",
           # mount points the daemons bind over (the root is read-only then)
           '--customize-hook=mkdir -p "$1/etc/docker/plugins"')
BUILD_TIMEOUT = 900


class SidRootUnavailable(RuntimeError):
    """No root and no way to build one here (the message says why)."""


@dataclass(frozen=True)
class SidRoot:
    path: Path
    build_seconds: float      # 0 when it came from the cache

    @property
    def dockerd(self) -> Path:
        return self.path / "usr/sbin/dockerd"

    @property
    def cli(self) -> Path:
        return self.path / "usr/bin/docker"

    @property
    def compose(self) -> Path:
        return self.path / "usr/libexec/docker/cli-plugins/docker-compose"

    def package_version(self, package: str) -> str:
        """The Debian version of an installed package, from dpkg's status file."""
        status = (self.path / "var/lib/dpkg/status").read_text()
        for block in status.split("\n\n"):
            fields = dict(line.split(": ", 1) for line in block.splitlines()
                          if ": " in line and not line.startswith(" "))
            if fields.get("Package") == package:
                return fields.get("Version", "?")
        return "not installed"


def cache_dir() -> Path:
    return Path(os.environ.get("FANLAB_CACHE", "/var/cache/fan-driver-tests"))


def recipe_digest() -> str:
    return hashlib.sha256(json.dumps([SUITE, PACKAGES, OPTIONS]).encode()).hexdigest()[:12]


def cached_root() -> Path | None:
    """The root's path when it is already built, else None (builds nothing)."""
    path = cache_dir() / f"sid-{recipe_digest()}" / "root"
    return path if (path.parent / "complete").exists() else None


def sid_root() -> SidRoot:
    """The cached root, built first if missing. Raises SidRootUnavailable
    naming the reason (no mmdebstrap, the mirror unreachable, ...)."""
    base = cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "sid.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = cached_root()
        if found is not None:
            return SidRoot(found, 0.0)
        return _build(base / f"sid-{recipe_digest()}")


def _build(target: Path) -> SidRoot:
    mmdebstrap = shutil.which("mmdebstrap", path=env_with_sbin()["PATH"])
    if not mmdebstrap:
        raise SidRootUnavailable("mmdebstrap is not installed (apt-get install mmdebstrap): "
                                 "Debian unstable's dockerd cannot be set up")
    for old in target.parent.glob("sid-*"):
        shutil.rmtree(old, ignore_errors=True)     # other recipes, or a half-built one
    target.mkdir(parents=True)
    started = time.monotonic()
    try:
        run_cmd([mmdebstrap, *OPTIONS, f"--include={','.join(PACKAGES)}", SUITE,
                 str(target / "root")], timeout=BUILD_TIMEOUT)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(target, ignore_errors=True)
        said = "\n".join(str(getattr(exc, "stderr", "") or "").strip().splitlines()[-6:])
        raise SidRootUnavailable(f"mmdebstrap could not build the {SUITE} root (no network to "
                                 f"the Debian mirror?): {said or exc}") from None
    (target / "complete").write_text(json.dumps({"suite": SUITE, "packages": PACKAGES}))
    return SidRoot(target / "root", time.monotonic() - started)


def main() -> int:
    """For .ci/run: build or find the root, say
    what it holds. Exit status 0 either way: the tests skip docker-sid when
    the root cannot be had, and say why."""
    try:
        root = sid_root()
    except SidRootUnavailable as exc:
        print(f"docker-sid: unavailable: {exc}")
        return 0
    versions = ", ".join(f"{p} {root.package_version(p)}" for p in ("docker.io", "docker-compose"))
    print(f"docker-sid: {versions} in {root.path} (built in {root.build_seconds:.0f} s; "
          f"0 = cached)")
    return 0


__all__ = ["SidRoot", "SidRootUnavailable", "sid_root", "cached_root", "PACKAGES"]
