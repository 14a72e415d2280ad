"""Crash points, for testing that a crash at any step loses nothing.

`FAN_CRASH_AT=<point>` (or `<point>@<n>` for the n-th time the point is
reached) makes the plugin die on the spot, exit status 137 as after SIGKILL:
no cleanup, no reply, no state written after that point. Unset, every check
is a no-op. The points name the steps of each operation in the order the code
takes them, e.g. "create_endpoint:after_kernel" (the veth exists, the state
does not say so yet) and "create_endpoint:after_state" (saved, no reply sent).
"""
from __future__ import annotations

import logging
import os
from typing import Mapping, Optional

from .errors import FanError

log = logging.getLogger(__name__)

ENV = "FAN_CRASH_AT"
EXIT_STATUS = 137   # what a shell reports for a process killed by SIGKILL

POINTS = (
    # Creations change the kernel first, then save the state.
    "create_network:after_kernel", "create_network:after_state",
    "create_endpoint:after_kernel", "create_endpoint:after_state",
    "join:after_kernel",
    # Publishing ports takes them first; revoking forgets them first.
    "program_external_connectivity:after_kernel", "revoke_external_connectivity:after_state",
    # Removals save the state first, then change the kernel: a crash in between
    # leaves kernel objects that no state accounts for, which the Reconciler removes.
    "delete_network:after_state", "delete_network:after_kernel",
    "delete_endpoint:after_state", "delete_endpoint:after_kernel",
    "leave:before_reply",
    # The IPAM only writes state. A crash before a release writes it is a
    # release lost, as when a dockerd restart stops a managed plugin first.
    "request_pool:after_state", "release_pool:after_state",
    "request_address:after_state", "release_address:before_state",
    "release_address:after_state",
    # Start-up reconciliation.
    "restore:after_orphans", "restore:after_network",
)


class Faults:
    def __init__(self, crash_at: Optional[str] = None):
        self.point, self.count = None, 1
        if crash_at:
            point, _, count = crash_at.partition("@")
            if point not in POINTS or (count and not count.isdigit()) or count == "0":
                raise FanError(f"{ENV}={crash_at!r}: expected one of {', '.join(POINTS)}, "
                               "optionally followed by @N (crash the N-th time)")
            self.point, self.count = point, int(count or 1)
        self.seen = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Faults":
        return cls(environ.get(ENV) or None)

    def check(self, point: str) -> None:
        """Die here if this is the point (and the time) we were told to."""
        if point != self.point:
            return
        self.seen += 1
        if self.seen == self.count:
            log.critical("%s=%s: crashing at %s", ENV, self.point, point)
            logging.shutdown()
            os._exit(EXIT_STATUS)


NO_FAULTS = Faults()
