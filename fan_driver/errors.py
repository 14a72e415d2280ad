"""Errors the plugin reports back to Docker as {"Err": message}."""
from __future__ import annotations

import errno
import os


class FanError(Exception):
    """A request that cannot be served; the message names the problem and the fix."""


class NotFound(FanError):
    """A request names a network, endpoint, pool or address this plugin does not hold."""


# What to do about the kernel's most common refusals; the object is named by the caller.
KERNEL_FIXES = {
    errno.EEXIST: "something that fan-driver did not make is in the way; remove it or choose "
                  "another overlay",
    errno.EPERM: "fan-driver needs CAP_NET_ADMIN in the host's network namespace; run it as "
                 "root or grant the capability",
    errno.EACCES: "fan-driver needs CAP_NET_ADMIN in the host's network namespace; run it as "
                  "root or grant the capability",
    errno.EOPNOTSUPP: "this kernel lacks the feature; run `fan-driver check`, or choose another "
                      "mapping or encap",
    errno.ENODEV: "a device it needs is missing (deleted meanwhile?); restart fan-driver to "
                  "restore the network",
    errno.ENOENT: "something it needs is missing (deleted meanwhile?); restart fan-driver to "
                  "restore the network",
    errno.ENETDOWN: "a device it needs is down; bring it up (`ip link set DEV up`) or restart "
                    "fan-driver to restore the network",
    errno.ENOBUFS: "the kernel ran out of room for replies or table entries; raise the "
                   "limits (net.core.rmem_max, neighbour gc_thresh) or use a smaller underlay",
    errno.ENOSPC: "a kernel table is full; raise its limit or use a smaller underlay",
    errno.ERANGE: "a value is out of the kernel's range; check the network's options",
    errno.EINVAL: "the kernel rejected the request's values; check the network's options "
                  "and run `fan-driver check`",
    # Bringing up a tunnel device binds its UDP port: Docker swarm's overlay
    # networks hold 4789 unless the swarm was made with another data path port.
    errno.EADDRINUSE: "the tunnel's UDP port (VXLAN 4789 unless -o vxlan_port says otherwise; "
                      "8472 with -o mapping=routes) is held by another socket here, such as "
                      "Docker swarm's overlay VXLAN: create the fan network with "
                      "-o vxlan_port=<a free port, the same on every host>, or "
                      "make the swarm use another port (`docker swarm init --data-path-port "
                      "4790`), or free the port",
}
OTHER_FIX = "run `fan-driver check`, and report it with the plugin's log if it persists"


class KernelError(FanError):
    """The kernel refused a request: what was being done, the errno, the kernel's
    own explanation where it gave one, and what to do about it."""

    def __init__(self, doing: str, code: int, detail: str = ""):
        self.code = code
        reason = f"{os.strerror(code)} (errno {code})"
        if detail and detail != os.strerror(code):
            reason += f", {detail}"
        super().__init__(f"{doing}: {reason}: {KERNEL_FIXES.get(code, OTHER_FIX)}")
