"""The one home of the plugin's state: a JSON file in the state directory.

Every change is written whole to a temporary file, fsynced and renamed over the
old one, so a crash leaves either the old state or the new one, never a mix.
A request that changes nothing writes nothing. The directory is the root's
alone (0700), each temporary file is made anew (never an existing name, never
through a symlink, 0600), and a copy of the last state written is kept beside
the file: a file that cannot be read stops the plugin before it touches the
kernel (a plugin that believed the state empty would sweep every fan object),
and the copy is what to put back.
Every read-modify-write, from any process, holds the directory's flock and
starts from the file (`try_lock`, `reread`); the lock file keeps a second
serving plugin off the same directory for its life.
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Tuple

from .errors import FanError
from .model import STATE_VERSION, NewerState, State

STATE_FILE = "state.json"
LAST_GOOD_FILE = "state.json.last-good"
LOCK_FILE = "lock"
TEMPORARY_SUFFIX = ".tmp"


class Store:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._lock_fd = None
        self._change_fd = None
        self._on_disk = None   # the file's text, as last opened, reread or written

    def open(self) -> State:
        """Claim the directory for this serving plugin and read the state (empty when new)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            os.chmod(self.directory, 0o700)   # also one made before, or by someone else
        except OSError as exc:
            raise FanError(f"state directory {self.directory} cannot be made private (mode "
                           f"0700): {exc.strerror}; give it to the user the plugin runs as "
                           "(root)") from None
        fd = os.open(self.directory / LOCK_FILE,
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FanError(
                f"another fan-driver is already using state directory {self.directory}; "
                "stop it or give --state-dir another directory") from None
        self._lock_fd = fd
        for stale in self.directory.glob(f".*{TEMPORARY_SUFFIX}"):
            stale.unlink()   # a save cut short; the file it was to replace is whole
        state, self._on_disk = self._read()
        return state

    def load(self) -> State:
        """The state the file holds (empty when there is none)."""
        return self._read()[0]

    def _read(self) -> Tuple[State, Optional[str]]:
        path, last_good = self.directory / STATE_FILE, self.directory / LAST_GOOD_FILE
        try:
            text = path.read_text()
            state = State.from_json(json.loads(text))
        except FileNotFoundError:
            if last_good.exists():
                raise FanError(
                    f"state file {path} is missing but {last_good}, the last state this "
                    f"fan-driver wrote, is there: copy it to {path} to keep its networks, "
                    "or move it aside too to start empty") from None
            return State(), None
        except NewerState as exc:
            raise FanError(
                f"state file {path} has version {exc.version}, newer than this fan-driver's "
                f"{STATE_VERSION}: a newer fan-driver wrote it. Run that version (or a later "
                "one) again; moving the file aside would forget its networks") from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            fix = (f"copy {last_good}, the last state this fan-driver wrote, over it"
                   if last_good.exists() else "move it aside to start empty")
            raise FanError(f"state file {path} is corrupt ({exc!r}); {fix}. Nothing in the "
                           "kernel was changed") from exc
        return state, text

    def try_lock(self) -> bool:
        """Take the lock of one read-modify-write, unless another holds it."""
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._change_fd = fd
        return True

    def unlock(self) -> None:
        os.close(self._change_fd)
        self._change_fd = None

    def reread(self) -> Optional[State]:
        """The state in the file if it changed since this store opened, reread or
        wrote it (another process saved), else None."""
        try:
            text = (self.directory / STATE_FILE).read_text()
        except FileNotFoundError:
            text = None
        if text == self._on_disk:
            return None
        state, self._on_disk = self._read()
        return state

    def save(self, state: State) -> dict:
        """Write the state unless the file already holds it; returns it as plain data."""
        data = state.to_json()
        # No indent: only then does json use its C encoder (5x faster here).
        text = json.dumps(data, sort_keys=True)
        if text == self._on_disk:
            return data
        for name in (STATE_FILE, LAST_GOOD_FILE):
            self._replace(name, text)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._on_disk = text
        return data

    def _replace(self, name: str, text: str) -> None:
        """Write `name` whole through a new temporary file (mkstemp: O_EXCL, so
        neither an existing file nor a symlink planted under its name; 0600)."""
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=TEMPORARY_SUFFIX,
                                   dir=self.directory)
        try:
            with open(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.directory / name)
        except BaseException:
            os.unlink(tmp)
            raise

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
