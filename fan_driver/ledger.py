"""The state shared by the network and IPAM drivers, changed one request at a time."""
from __future__ import annotations

import asyncio
import copy
from contextlib import asynccontextmanager
from typing import AsyncIterator

from .model import State
from .store import Store


class Ledger:
    def __init__(self, store: Store, state: State):
        self.store = store
        self.state = state
        self._lock = asyncio.Lock()

    @asynccontextmanager
    async def change(self) -> AsyncIterator[State]:
        """Serialise a request; keep its changes only if it succeeds, and save them."""
        async with self._lock:
            snapshot = copy.deepcopy(self.state)
            try:
                yield self.state
                self.store.save(self.state)
            except BaseException:
                self.state = snapshot
                raise

    @asynccontextmanager
    async def read(self) -> AsyncIterator[State]:
        async with self._lock:
            yield self.state
