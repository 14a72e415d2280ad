"""Running commands and ending processes, always by PID."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

# dockerd, ip and iptables live in sbin; a pyenv or venv PATH may lack it.
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class CommandError(subprocess.CalledProcessError):
    """A failed command whose message carries its output, so a failing test
    shows what the command said."""

    def __str__(self) -> str:
        cmd = " ".join(map(str, self.cmd)) if isinstance(self.cmd, (list, tuple)) else self.cmd
        parts = [f"command failed with exit status {self.returncode}: {cmd}"]
        if self.stdout:
            parts.append(f"--- stdout ---\n{self.stdout.rstrip()}")
        if self.stderr:
            parts.append(f"--- stderr ---\n{self.stderr.rstrip()}")
        return "\n".join(parts)


def env_with_sbin(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    paths = env.get("PATH", "").split(":")
    env["PATH"] = ":".join([p for p in paths if p] +
                           [p for p in SBIN_PATH.split(":") if p not in paths])
    env.update(extra or {})
    return env


def run_cmd(cmd: Sequence[str], check: bool = True, timeout: float = 60,
            input: str | None = None, env: dict | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run a command, capture text output; raise CommandError when check and
    the exit status is not 0."""
    cmd = [str(c) for c in cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            input=input, env=env or env_with_sbin(), cwd=cwd)
    if check and result.returncode != 0:
        raise CommandError(result.returncode, cmd, result.stdout, result.stderr)
    return result


def wait_answering(proc: subprocess.Popen | None, probe, timeout: float,
                   interval: float) -> str | None:
    """Poll probe() -> (HTTP status, body) until it answers 200 while proc runs.
    None when it did; otherwise why not: the process exited, or its last answer."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc is None or proc.poll() is not None:
            return f"exited ({proc.returncode if proc else None}) while starting"
        try:
            status, body = probe()
            if status == 200:
                return None
            last = f"HTTP {status}: {str(body)[:200]}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(interval)
    return f"not ready after {timeout:.0f}s ({last})"


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # A zombie has exited; only its parent's wait() is missing.
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def send_signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop_popen(proc: subprocess.Popen, timeout: float = 20, sig: int = signal.SIGTERM) -> int:
    """Signal a child by its PID, wait, SIGKILL when it does not go in time."""
    if proc.poll() is None:
        send_signal(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            send_signal(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return proc.returncode


def kill_pids(pids, timeout: float = 10) -> None:
    """SIGTERM the given PIDs (not our children), then SIGKILL whatever is left."""
    pids = [p for p in pids if p != os.getpid()]
    for pid in pids:
        send_signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if pid_alive(pid):
            send_signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)


def all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def with_descendants(roots) -> set[int]:
    """The given PIDs and every process below them."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        ppid = parent_pid(pid)
        if ppid is not None:
            children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def ns_inode(pid: int, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def pids_in_ns(kind: str, ident: str) -> list[int]:
    return [pid for pid in all_pids() if ns_inode(pid, kind) == ident]


def tail(path: str | Path, lines: int = 40, width: int = 400,
         keep: Callable[[str], bool] | None = None) -> str:
    """The last `lines` lines of a log (of those `keep` accepts, when given),
    each cut to `width` characters."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    kept = [line for line in text.splitlines() if keep is None or keep(line)]
    return "\n".join(line if len(line) <= width else
                     f"{line[:width]} ...[{len(line) - width} more chars]"
                     for line in kept[-lines:])


def mountinfo() -> list[dict]:
    entries = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, post = line.rstrip("\n").split(" - ", 1)
            pre_fields, post_fields = pre.split(), post.split()
            entries.append({
                "mountpoint": pre_fields[4].replace("\\040", " "),
                "mount_opts": pre_fields[5].split(","),
                "fstype": post_fields[0],
                "source": post_fields[1],
                "super_opts": post_fields[2] if len(post_fields) > 2 else "",
            })
    return entries


def cgroup_hierarchies() -> list[str]:
    """Mountpoints of the host's cgroup (v1) and cgroup2 filesystems."""
    return [m["mountpoint"] for m in mountinfo() if m["fstype"] in ("cgroup", "cgroup2")]


def remove_cgroup_trees(name: str) -> None:
    """rmdir /<hierarchy>/<name> and everything below it, in every cgroup
    hierarchy (a cgroup directory goes with its control files once empty)."""
    for hierarchy in cgroup_hierarchies():
        top = Path(hierarchy) / name
        if top.is_dir():
            for dirpath, _dirs, _files in os.walk(top, topdown=False):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass


class ChildProcess:
    """A lab process we started (`proc`, None until started), logging to log_path."""
    proc: subprocess.Popen | None = None
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def failure_log(self) -> str:
        """What a failed test that used this process shows of its log."""
        return self.log_tail(60)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
