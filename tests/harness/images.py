"""Local images, since no registry is reachable: a busybox image made from
Debian's busybox-static, built once per session as a tarball and imported into
each dockerd that needs it."""
from __future__ import annotations

import atexit
import io
import os
import shutil
import struct
import tarfile
import tempfile
import time
from pathlib import Path

from .procs import pid_alive, run_cmd

# Applets the tests rely on; checked so a busybox without them fails loudly.
REQUIRED_APPLETS = ("sh", "ping", "ip", "ifconfig", "route", "nc", "wget", "sleep", "cat",
                    "md5sum", "sha256sum", "dd", "head", "httpd", "echo", "ls", "hostname")
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


class ImageCache:
    """Tarballs built in this process, in one temporary directory."""

    def __init__(self):
        self.dir: Path | None = None
        self.tarballs: dict[str, Path] = {}
        self.build_seconds: dict[str, float] = {}

    def path_for(self, name: str) -> Path:
        if self.dir is None:
            self._remove_dead_runs_dirs()
            self.dir = Path(tempfile.mkdtemp(prefix=f"fanlab-images-{os.getpid()}-"))
        return self.dir / name

    @staticmethod
    def _remove_dead_runs_dirs() -> None:
        # fanlab-images-<pid>-*: a test run killed before its atexit hook ran.
        for old in Path(tempfile.gettempdir()).glob("fanlab-images-*-*"):
            pid = old.name.split("-")[2]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)

    def cleanup(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None
        self.tarballs.clear()


CACHE = ImageCache()
atexit.register(CACHE.cleanup)


def find_static_busybox() -> str:
    for path in BUSYBOX_CANDIDATES:
        if Path(path).is_file() and _is_static_elf(path):
            return path
    raise FileNotFoundError("no static busybox (apt-get install busybox-static): "
                            f"looked at {', '.join(BUSYBOX_CANDIDATES)}")


def _is_static_elf(path: str) -> bool:
    """True when the ELF has no PT_INTERP (program interpreter) header."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:    # 64-bit only
            return False
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def _applets(busybox: str) -> list[str]:
    out = run_cmd([busybox, "--list-full"]).stdout.split()
    names = {Path(p).name for p in out}
    missing = [a for a in REQUIRED_APPLETS if a not in names]
    if missing:
        raise RuntimeError(f"{busybox} lacks applets {missing}")
    return out


def build_busybox_tarball(dest: Path, busybox: str | None = None) -> Path:
    """A root filesystem tarball: /bin/busybox, a symlink per applet at its
    usual place (what `busybox --install -s` makes), and a minimal /etc."""
    busybox = busybox or find_static_busybox()
    applets = _applets(busybox)
    tmp = dest.with_suffix(".partial")
    with tarfile.open(tmp, "w") as tar:
        def add_dir(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)

        def add_file(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))

        dirs = {"bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root", "var", "var/www",
                "proc", "sys", "dev", "run", "home"} | {str(Path(a).parent) for a in applets}
        for d in sorted(dirs):
            add_dir(d)
        add_dir("tmp", 0o1777)
        add_file("bin/busybox", Path(busybox).read_bytes(), 0o755)
        for applet in applets:
            if applet == "bin/busybox":
                continue
            info = tarfile.TarInfo(applet)
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, "/bin/busybox", 0o777
            tar.addfile(info)
        add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                               b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
        add_file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
        add_file("var/www/index.html", b"fanlab\n")
    tmp.rename(dest)
    return dest


def busybox_tarball() -> Path:
    """Built at most once per process."""
    if "busybox" not in CACHE.tarballs:
        started = time.monotonic()
        CACHE.tarballs["busybox"] = build_busybox_tarball(CACHE.path_for("busybox.tar"))
        CACHE.build_seconds["busybox"] = time.monotonic() - started
    return CACHE.tarballs["busybox"]


def ensure_busybox(dockerd, name: str = "busybox") -> str:
    """Import the busybox rootfs into `dockerd` as `name` unless it has it.
    Returns the image name. The image's CMD is `sh`."""
    if dockerd.cli("image", "inspect", name, check=False, timeout=60).returncode == 0:
        return name
    tarball = busybox_tarball()
    dockerd.cli("import", "--change", 'CMD ["sh"]', str(tarball), name, timeout=120)
    return name


def import_tarball(dockerd, tarball: Path, name: str, changes=()) -> str:
    """`docker import` any rootfs tarball, with Dockerfile-style --change lines."""
    args = ["import"]
    for change in changes:
        args += ["--change", change]
    dockerd.cli(*args, str(tarball), name, timeout=300)
    return name


__all__ = ["ensure_busybox", "busybox_tarball", "build_busybox_tarball", "import_tarball",
           "find_static_busybox", "CACHE"]
