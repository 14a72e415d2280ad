"""A throwaway QEMU guest running Debian's kernel, for tests that need kernel
features this machine's kernel lacks (IPIP, kernel modules).

    guest = build_guest()                 # once: packages, kernel, initramfs
    code, output = guest.run("modprobe ipip && ip link add t type ipip external")

Each run boots one VM: the host's / is the guest's root (read-only 9p with a
tmpfs overlay, so the guest can write but the host never changes), the project
directory is shared read-write at the same path, and the command runs with
/bin/sh from the project directory. `guest.python` is a host interpreter that
works inside (the real path, not a pyenv shim). Everything else the kernel
needs (ipip, veth, vxlan, ...) loads with modprobe from the host's
/lib/modules, where linux-image-amd64 put it.

Software emulation only: this machine's /dev/kvm cannot run Debian's kernel,
so code in the guest runs 20-30 times slower than on the
host. Keep what runs inside small.
"""
from __future__ import annotations

import fcntl
import hashlib
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

APT_PACKAGES = ("linux-image-amd64", "qemu-system-x86", "busybox-static", "cpio", "kmod", "xz-utils")
# Enough to mount the shares and the overlay; the rest loads inside the guest.
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
QEMU = "qemu-system-x86_64"
HERE = Path(__file__).resolve().parent
PROJECT_DIR = HERE.parent.parent
INIT_SCRIPT = HERE / "init.sh"


class GuestError(RuntimeError):
    """The guest could not be built, did not start, or did not finish."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("FAN_VM_CACHE", "/var/tmp/fan-driver-vm"))


@dataclass
class Guest:
    kernel: Path            # raw vmlinux (boots faster) or the bzImage
    initramfs: Path
    kver: str
    cache_dir: Path
    project_dir: Path = PROJECT_DIR
    # The interpreter running the tests, by its real path: a pyenv shim would
    # cost seconds in the guest, and the host's site-packages come with it.
    python: str = field(default_factory=lambda: os.path.realpath(sys.executable))
    last_timings: dict = field(default_factory=dict)

    def qemu_argv(self, xfer: Path) -> list[str]:
        def share(tag, path, extra=""):
            return ["-fsdev", f"local,id={tag},path={path},security_model=none{extra}",
                    "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}"]
        return [
            QEMU, "-accel", "tcg,thread=multi", "-cpu", "max", "-m", "1024", "-smp", "2",
            "-nographic", "-no-reboot", "-nic", "none",
            "-kernel", str(self.kernel), "-initrd", str(self.initramfs),
            # quiet: every console line costs time on an emulated UART;
            # panic=-1 with -no-reboot makes a crashed guest end qemu at once.
            "-append", f"console=ttyS0 quiet panic=-1 fanvm.project={self.project_dir}",
            # multidevs=remap: the host's / spans several filesystems; keeps
            # inode numbers unique in the guest.
            *share("hostroot", "/", ",readonly=on,multidevs=remap"),
            *share("project", self.project_dir),
            *share("xfer", xfer),
        ]

    def run(self, command: str, timeout: float = 300) -> tuple[int, str]:
        """Boot a VM, run `command` with /bin/sh inside, power off.
        Returns (exit status, stdout+stderr). Raises GuestError with the tail
        of the console if the guest does not start or does not finish in time."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="run-", dir=self.cache_dir) as tmp:
            xfer = Path(tmp)
            # qemu's -fsdev and the kernel command line cannot take these.
            if re.search(r"[\s,]", f"{self.project_dir}{xfer}"):
                raise GuestError(f"paths with spaces or commas are not supported: {self.project_dir}, {xfer}")
            (xfer / "command").write_text(command + "\n")
            console = xfer / "console.log"
            start = time.monotonic()
            with open(console, "wb") as log:
                proc = subprocess.Popen(self.qemu_argv(xfer), stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    raise GuestError(f"guest did not finish within {timeout} s (qemu pid "
                                     f"{proc.pid} killed)\n{tail(console)}\n{tail(xfer / 'output')}") from None
                finally:
                    # Never leave a qemu behind: on timeout, Ctrl-C or any error.
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
            wall = time.monotonic() - start
            if not (xfer / "started").exists():
                raise GuestError(f"guest did not start (qemu exit {proc.returncode})\n{tail(console)}")
            if not (xfer / "status").exists():
                raise GuestError(f"guest stopped before the command finished\n{tail(console)}"
                                 f"\n{tail(xfer / 'output')}")
            started = float((xfer / "started").read_text().split()[0])
            finished = float((xfer / "finished").read_text().split()[0])
            # boot: host wall time minus the command (so it includes qemu's
            # start and the power-off); boot_to_command: the guest's own uptime
            # when the command started.
            self.last_timings = {"wall": wall, "boot_to_command": started,
                                 "command": finished - started, "boot": wall - (finished - started)}
            output = (xfer / "output").read_text(errors="replace")
            return int((xfer / "status").read_text()), output


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no console output)"
    return f"--- {path.name} (tail) ---\n" + "\n".join(text.splitlines()[-lines:])


# --- building ----------------------------------------------------------------

def build_guest(cache_dir: Path | str | None = None) -> Guest:
    """Everything a run needs, made once and cached in `cache_dir` (default
    $FAN_VM_CACHE or /var/tmp/fan-driver-vm). Installs the Debian packages if
    they are missing. Safe to call from several processes at once."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        # One builder at a time (pytest-xdist workers, parallel sessions).
        fcntl.flock(lock, fcntl.LOCK_EX)
        ensure_packages()
        kver, bzimage = find_kernel()
        kernel = cache_dir / f"vmlinux-{kver}"
        if not kernel.exists():
            raw = extract_vmlinux(bzimage)
            if raw is None:
                kernel = bzimage
            else:
                atomic_write(kernel, raw)
        # The initramfs depends on the kernel, init.sh and how this file
        # builds it: key it by all three.
        key = hashlib.sha256(kver.encode() + INIT_SCRIPT.read_bytes()
                             + Path(__file__).read_bytes()).hexdigest()[:12]
        initramfs = cache_dir / f"initramfs-{kver}-{key}.cpio"
        if not initramfs.exists():
            for stale in cache_dir.glob("initramfs-*.cpio"):
                stale.unlink()
            atomic_write(initramfs, make_initramfs(kver))
    return Guest(kernel=kernel, initramfs=initramfs, kver=kver, cache_dir=cache_dir)


def ensure_packages() -> None:
    missing = [p for p in APT_PACKAGES if not dpkg_installed(p)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise GuestError(f"missing Debian packages {missing} and not root to install them: "
                         f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    # A fresh machine may have stale or no package lists: update once on failure.
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        r = subprocess.run(install, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise GuestError(f"cannot install {missing}:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")


def dpkg_installed(package: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.endswith(" installed")


def find_kernel() -> tuple[str, Path]:
    """The newest Debian kernel with both an image in /boot and its modules."""
    found = [p.name[len("vmlinuz-"):] for p in Path("/boot").glob("vmlinuz-*")]
    found = [k for k in found if (Path("/lib/modules") / k / "modules.dep").exists()]
    if not found:
        raise GuestError("no kernel with modules under /boot and /lib/modules: "
                         "apt-get install linux-image-amd64")
    kver = max(found, key=lambda k: [int(n) for n in re.findall(r"\d+", k)])
    return kver, Path("/boot") / f"vmlinuz-{kver}"


def extract_vmlinux(bzimage: Path) -> bytes | None:
    """The bzImage's xz payload, decompressed: an ELF that qemu boots directly
    through its PVH entry note, skipping the in-guest decompression (about
    3 s under emulation). None when the image is not of that kind."""
    data = bzimage.read_bytes()
    at = data.find(b"\xfd7zXZ\x00")
    if at < 0:
        return None
    try:
        raw = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data[at:])
    except lzma.LZMAError:
        return None
    return raw if raw.startswith(b"\x7fELF") and has_pvh_note(raw) else None


def has_pvh_note(elf: bytes) -> bool:
    """Whether a 64-bit ELF carries XEN_ELFNOTE_PHYS32_ENTRY (what qemu needs
    to boot an uncompressed kernel)."""
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def make_initramfs(kver: str) -> bytes:
    """busybox-static, /init and the modules to mount 9p and overlay, as an
    uncompressed newc cpio (nothing to decompress at boot)."""
    deps = subprocess.run(["modprobe", "-a", "-S", kver, "--show-depends", *INITRAMFS_MODULES],
                          capture_output=True, text=True, check=True).stdout
    # "insmod /lib/modules/.../x.ko[.xz] " per module (builtin ones say
    # "builtin x"), dependencies first.
    kos = list(dict.fromkeys(line.split()[1] for line in deps.splitlines() if line.startswith("insmod ")))
    busybox = shutil.which("busybox", path="/bin:/usr/bin")
    if busybox is None:
        raise GuestError("busybox not found: apt-get install busybox-static")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "modules"):
            (root / d).mkdir()
        # The kernel opens /dev/console for /init before anything is mounted.
        os.mknod(root / "dev/console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
        shutil.copy(busybox, root / "bin/busybox")
        shutil.copy(INIT_SCRIPT, root / "init")
        (root / "init").chmod(0o755)
        order = []
        for ko in kos:
            # busybox insmod takes plain .ko files only: decompress here.
            name = Path(ko).name
            data = Path(ko).read_bytes()
            if name.endswith(".xz"):
                name, data = name[:-3], lzma.decompress(data)
            (root / "modules" / name).write_bytes(data)
            order.append(name)
        (root / "modules/order").write_text("\n".join(order) + "\n")
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        return subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files,
                              capture_output=True, check=True).stdout


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)
