"""The state shared by the network and IPAM drivers, changed one request at a time,
each change starting from what the file holds under the store's lock, so that
another process's changes are seen and never overwritten."""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

from .model import State
from .store import Store

LOCK_POLL = 0.005   # seconds between attempts while another process changes the state


class Ledger:
    def __init__(self, store: Store, state: State):
        self.store = store
        self.state = state
        self._lock = asyncio.Lock()
        # What the state file holds: a change that fails goes back to it.
        self._saved = state.to_json()

    @asynccontextmanager
    async def change(self) -> AsyncIterator[State]:
        """Serialise a request; keep its changes only if it succeeds, and save them."""
        async with self._lock:
            while not self.store.try_lock():
                await asyncio.sleep(LOCK_POLL)
            try:
                self._adopt_newer()
                try:
                    yield self.state
                    self._saved = self.store.save(self.state)
                except BaseException:
                    self.state = State.from_json(self._saved)
                    raise
            finally:
                self.store.unlock()

    def commit(self) -> None:
        """Inside change(): save now. Removals call it before touching the kernel,
        so that a crash or a failure after it leaves only kernel objects that no
        state accounts for (the Reconciler removes them), never state without them."""
        assert self._lock.locked(), "commit() outside change()"
        self._saved = self.store.save(self.state)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[State]:
        async with self._lock:
            self._adopt_newer()
            yield self.state

    def _adopt_newer(self) -> None:
        newer = self.store.reread()
        if newer is not None:
            self.state, self._saved = newer, newer.to_json()
