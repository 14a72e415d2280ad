"""End-to-end test harness: an underlay of network namespaces (netlab), a real
dockerd per lab host (dockerd), local images (images) and the fan plugin as a
process (plugin). Every name it makes starts with `fanlab-`; everything it
makes is removed at teardown.

    with Lab() as lab:
        h = lab.add_host("h28", "172.30.0.28/16")
        lab.add_outside("172.30.255.254/16")
        d = Dockerd(h).start(); ensure_busybox(d)
        d.cli("run", "--rm", "busybox", "echo", "hi")
"""
from .dockerd import Dockerd, DockerdError, docker_cli_path
from .images import ensure_busybox, import_tarball
from .netlab import Host, Lab, netns_list, private_prefix
from .plugin import PluginError, PluginProcess, plugin_available
from .procs import CommandError, run_cmd

__all__ = ["Lab", "Host", "netns_list", "private_prefix", "Dockerd", "DockerdError", "docker_cli_path",
           "ensure_busybox", "import_tarball", "PluginProcess", "PluginError",
           "plugin_available", "CommandError", "run_cmd", "missing_requirements"]

REQUIRED_TOOLS = ("ip", "dockerd", "containerd", "runc", "iptables", "sysctl", "mount")


def missing_requirements() -> list[str]:
    """What keeps the e2e harness from running here, in words; [] when nothing."""
    import os
    import shutil

    from .images import find_static_busybox
    from .procs import env_with_sbin

    missing = []
    if os.geteuid() != 0:
        missing.append("root (running as uid %d)" % os.geteuid())
    path = env_with_sbin()["PATH"]
    missing += [f"`{tool}` on PATH" for tool in REQUIRED_TOOLS if not shutil.which(tool, path=path)]
    try:
        docker_cli_path()
    except FileNotFoundError:
        missing.append("the docker CLI")
    try:
        find_static_busybox()
    except FileNotFoundError:
        missing.append("a static busybox (busybox-static)")
    return missing
