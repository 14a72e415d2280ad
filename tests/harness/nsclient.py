"""Test clients in a container's network namespace: this machine's python3
run with `nsenter -t PID -n` (busybox wget crashes here and its nc has no UDP),
so clients behave the same whatever the image holds."""
from __future__ import annotations

import subprocess
import sys

from .procs import run_cmd

# A DNS A query for argv[1] to argv[2]:53 over UDP; prints one address a line,
# or `rcode N` when the server answered without one.
DNS_QUERY = r"""
import random, socket, struct, sys
name, server = sys.argv[1], sys.argv[2]
ident = random.randrange(65536)
query = struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0)
query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
query += struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(query, (server, 53))
reply = s.recv(4096)
rcode, count = reply[3] & 15, struct.unpack(">H", reply[6:8])[0]
at = len(query)          # the reply repeats the question
for _ in range(count):
    at += 2 if reply[at] >= 0xC0 else reply.index(b"\0", at) - at + 1
    kind, _cls, _ttl, length = struct.unpack(">HHIH", reply[at:at + 10])
    at += 10
    if kind == 1:
        print(socket.inet_ntoa(reply[at:at + length]))
    at += length
if not count:
    print("rcode", rcode)
"""

# A TCP server on argv[1] that answers each connection with argv[2], then exits
# after argv[3] connections.
TCP_ANSWER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(8)
print("listening", flush=True)
for _ in range(int(sys.argv[3])):
    c, _ = s.accept()
    c.sendall(sys.argv[2].encode())
    c.close()
"""

TCP_FETCH = r"""
import socket, sys, time
deadline = time.monotonic() + 10
while True:
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
print(c.recv(4096).decode(), end="")
"""


def container_pid(dockerd, container: str) -> int:
    return int(dockerd.cli("inspect", "-f", "{{.State.Pid}}", container).stdout)


def ns_python(pid: int, code: str, *args: str, check: bool = True,
              timeout: float = 30) -> subprocess.CompletedProcess:
    """Run python code in process `pid`'s network namespace."""
    return run_cmd(["nsenter", "-t", str(pid), "-n", sys.executable, "-c", code, *args],
                   check=check, timeout=timeout)


def dns_query(pid: int, name: str, server: str = "127.0.0.11") -> list[str]:
    """The A records `server` gives for `name`, asked from pid's namespace
    (127.0.0.11: Docker's embedded DNS server); [] when it has none."""
    out = ns_python(pid, DNS_QUERY, name, server).stdout.split("\n")
    return [line for line in out if line and not line.startswith("rcode")]


def tcp_server(pid: int, port: int, answer: str, connections: int = 1) -> subprocess.Popen:
    """A TCP server in pid's namespace (started and listening when returned)."""
    proc = subprocess.Popen(["nsenter", "-t", str(pid), "-n", sys.executable, "-c", TCP_ANSWER,
                             str(port), answer, str(connections)],
                            stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "listening":
        proc.kill()
        raise RuntimeError(f"TCP server in the namespace of {pid} did not start")
    return proc


def tcp_fetch(pid: int, address: str, port: int) -> str:
    """What a TCP server at address:port says, asked from pid's namespace."""
    return ns_python(pid, TCP_FETCH, address, str(port)).stdout


__all__ = ["container_pid", "ns_python", "dns_query", "tcp_server", "tcp_fetch"]
