"""The fan plugin (`python -m fan_driver serve`) as a process in a lab host's
namespace, found by that host's dockerd through a spec file."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import unixhttp
from .netlab import Host
from .procs import (ChildProcess, env_with_sbin, run_cmd, send_signal, stop_popen,
                    wait_answering)

REPO_ROOT = Path(__file__).resolve().parents[2]


def plugin_env(extra: dict | None = None) -> dict:
    """The environment with this checkout first on PYTHONPATH."""
    paths = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]
    return env_with_sbin({"PYTHONPATH": ":".join(paths), "PYTHONUNBUFFERED": "1",
                          **(extra or {})})


def plugin_available(python: str = sys.executable) -> tuple[bool, str]:
    """(True, "") when `python -m fan_driver serve --help` works, else (False, why)."""
    try:
        result = run_cmd([python, "-m", "fan_driver", "serve", "--help"], check=False,
                         timeout=60, cwd=REPO_ROOT, env=plugin_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, repr(exc)
    if result.returncode == 0:
        return True, ""
    why = (result.stderr or result.stdout).strip().splitlines()[-5:]
    return False, f"`{python} -m fan_driver serve --help` exited {result.returncode}: " + \
        " | ".join(why)


class PluginError(RuntimeError):
    pass


class PluginProcess(ChildProcess):
    """`python -m fan_driver serve --socket S --state-dir D --log-level L` (debug)
    in `host`'s namespace; its log (appended across restarts) goes to log_path.

    start() writes /etc/netns/<ns>/docker/plugins/<name>.spec (unix://S) and
    waits until POST /Plugin.Activate answers; stop() / kill() end it by PID;
    call(method, body) talks to it like dockerd does.
    """

    def __init__(self, host: Host, socket_path: str | Path, state_dir: str | Path,
                 log_path: str | Path, name: str = "fan", extra_args: tuple[str, ...] = (),
                 log_level: str = "debug",
                 python: str = sys.executable, env: dict | None = None,
                 start_timeout: float = 30):
        self.host = host
        self.socket_path = Path(socket_path)
        self.state_dir = Path(state_dir)
        self.log_path = Path(log_path)
        self.name = name
        self.extra_args = tuple(extra_args)
        self.log_level = log_level
        self.python = python
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        self.start_seconds: float | None = None
        self.proc: subprocess.Popen | None = None
        self._log = None
        host.lab.add_cleanup(self.close, host)

    @property
    def spec_path(self) -> Path:
        return self.host.etc_dir / "docker" / "plugins" / f"{self.name}.spec"

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def command(self) -> list[str]:
        return [self.python, "-m", "fan_driver", "serve", "--socket", str(self.socket_path),
                "--state-dir", str(self.state_dir), "--log-level", self.log_level, *self.extra_args]

    def write_spec(self) -> None:
        self.spec_path.parent.mkdir(parents=True, exist_ok=True)
        self.spec_path.write_text(f"unix://{self.socket_path}\n")

    def start(self, timeout: float | None = None) -> "PluginProcess":
        if self.running:
            return self
        timeout = self.start_timeout if timeout is None else timeout
        self.write_spec()
        for d in (self.socket_path.parent, self.state_dir, self.log_path.parent):
            d.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n==== fanlab: starting plugin at {time.ctime()} ====\n".encode())
        self._log.flush()
        started = time.monotonic()
        # ip netns exec execs: proc.pid is the plugin's python.
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.host.name, *self.command()],
                                     stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                     env=plugin_env(self.env), start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        self.start_seconds = time.monotonic() - started
        return self

    def _wait_ready(self, timeout: float) -> None:
        why = wait_answering(self.proc, lambda: self.call("Plugin.Activate", {}, timeout=5),
                             timeout, 0.05)
        if why:
            raise PluginError(f"plugin on {self.socket_path} in {self.host.name}: {why}; "
                              f"log {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM by PID, SIGKILL after `timeout`; returns the exit status."""
        if self.proc is None:
            return None
        code = stop_popen(self.proc, timeout=timeout)
        self._close_log()
        return code

    def kill(self) -> int | None:
        """SIGKILL by PID (a crash: the socket file stays behind)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            send_signal(self.proc.pid, signal.SIGKILL)
        code = self.proc.wait(timeout=30)
        self._close_log()
        return code

    def restart(self, timeout: float | None = None) -> "PluginProcess":
        self.stop()
        return self.start(timeout)

    def _close_log(self) -> None:
        if self._log:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop it and remove its spec file (state and log are the caller's)."""
        self.stop()
        try:
            self.spec_path.unlink()
        except FileNotFoundError:
            pass

    # -- talking to it ----------------------------------------------------------------

    def call(self, method: str, body=None, timeout: float = 10):
        """POST /<method> (e.g. "NetworkDriver.CreateNetwork") with a JSON body as
        dockerd does; returns (HTTP status, decoded JSON or text or None)."""
        return unixhttp.post_json(self.socket_path, f"/{method.lstrip('/')}", body,
                                  timeout=timeout)

    def activate(self) -> dict:
        status, body = self.call("Plugin.Activate", {})
        if status != 200:
            raise PluginError(f"Plugin.Activate: HTTP {status}: {body}")
        return body

    def _command(self, command: str, *args: str, check: bool,
                 timeout: float) -> subprocess.CompletedProcess:
        """`python -m fan_driver <command> --state-dir <state_dir> ...`, run in
        the host's namespace."""
        return run_cmd(["ip", "netns", "exec", self.host.name, self.python, "-m", "fan_driver",
                        command, "--state-dir", str(self.state_dir), *args],
                       check=check, cwd=REPO_ROOT, env=plugin_env(self.env), timeout=timeout)

    def show(self, *args: str) -> str:
        """Output of `fan-driver show`."""
        return self._command("show", *args, check=True, timeout=60).stdout

    def check(self, *args: str) -> subprocess.CompletedProcess:
        """`fan-driver check`; its exit status is the caller's to judge."""
        return self._command("check", *args, check=False, timeout=120)

    def __repr__(self) -> str:
        return f"PluginProcess(host={self.host.name}, pid={self.pid}, socket={self.socket_path})"
