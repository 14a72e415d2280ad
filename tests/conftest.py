"""Session fixtures for end-to-end tests (see tests/harness/).

    root_required   skips, naming what is missing, unless root with ip, dockerd...
    lab             one Lab: host `fanlab-h28` (172.30.0.28/16, default route via
                    the outside) and `fanlab-outside` (172.30.255.254/16)
    lab_host        lab.host("h28")
    plugin          the fan plugin (PluginProcess) in fanlab-h28; skips when
                    `python -m fan_driver serve --help` fails, fails when it
                    does not start. dockerd finds it as `fan` (-d fan --ipam-driver fan)
    docker_flavour  "host" or "sid" (harness.dockerd.FLAVOURS), a session-scoped
                    parameter with ids docker-host / docker-sid: every test that
                    uses it (through dockerd, busybox, the managed plugin's mp, ...)
                    runs once per flavour, pytest grouping the tests by flavour so
                    each daemon starts once. docker-sid skips, saying why, when
                    Debian unstable's root cannot be had (harness.sidroot).
                    FANLAB_DOCKER=host|sid runs one flavour only.
    dockerd         one Dockerd of that flavour in fanlab-h28 with image `busybox`;
                    .flavour, .version (the daemon's), .label ("docker-sid 28.5.2...")
    busybox         the image name ("busybox")

The plugin process is started before dockerd and stopped after it (so dockerd's
teardown can still remove fan networks); after each test, a session dockerd or
plugin that the test stopped is started again. A failed e2e test's report
carries the tail of both logs. FANLAB_LOGS=<dir> keeps copies of the logs.

The report header names the daemons, the summary the versions the tests ran
against, the harness timings and the time spent per e2e file and flavour.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.harness import (Dockerd, Lab, PluginError, PluginProcess, ensure_busybox,
                           missing_requirements, plugin_available)
from tests.harness import images, managed, sidroot
from tests.harness.consistency import read_state
from tests.harness.dockerd import FLAVOURS
from tests.harness.procs import ChildProcess, env_with_sbin, run_cmd
from fan_driver.store import LAST_GOOD_FILE, STATE_FILE

E2E_DIR = Path(__file__).resolve().parent / "e2e"
HOLDER = pytest.StashKey[dict]()


def _holder(config) -> dict:
    if HOLDER not in config.stash:
        config.stash[HOLDER] = {"timings": {}, "versions": {}, "durations": {},
                                "lock_waits": []}
    return config.stash[HOLDER]


def _flavours() -> list[str]:
    chosen = os.environ.get("FANLAB_DOCKER")
    if chosen and chosen not in FLAVOURS:
        raise pytest.UsageError(f"FANLAB_DOCKER={chosen!r}: one of {sorted(FLAVOURS)}")
    return [chosen] if chosen else list(FLAVOURS)


def pytest_report_header(config):
    lines = []
    for flavour in _flavours():
        if flavour == "host":
            found = shutil.which("dockerd", path=env_with_sbin()["PATH"])
            what = run_cmd([found, "--version"]).stdout.strip() if found else "no dockerd"
        else:
            root = sidroot.cached_root()
            what = (f"{root} ({sidroot.SidRoot(root, 0).package_version('docker.io')})" if root
                    else "root not built yet (built by the first test that needs it)")
        lines.append(f"docker-{flavour} ({FLAVOURS[flavour]}): {what}")
    return lines


def pytest_collection_modifyitems(config, items):
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def root_required():
    missing = missing_requirements()
    if missing:
        pytest.skip("e2e harness cannot run here; missing: " + "; ".join(missing))


@pytest.fixture(scope="session")
def harness_timings(pytestconfig) -> dict:
    """{what: seconds}, printed at the end of the run."""
    return _holder(pytestconfig)["timings"]


@pytest.fixture(scope="session")
def lab_lock_waits(pytestconfig) -> list:
    """Seconds a Lab waited for another run's lock: appended by whoever made
    the Lab, left out of the time per file (charged to the test being set up)."""
    return _holder(pytestconfig)["lock_waits"]


@pytest.fixture(scope="session")
def lab(root_required, harness_timings, lab_lock_waits):
    started = time.monotonic()
    lab = Lab()
    try:
        lab.add_host("h28", "172.30.0.28/16")
        lab.add_outside("172.30.255.254/16")
        harness_timings["lab lock wait (another run)"] = lab.lock_wait_seconds
        lab_lock_waits.append(lab.lock_wait_seconds)
        harness_timings["lab build"] = time.monotonic() - started - lab.lock_wait_seconds
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="session")
def lab_host(lab):
    return lab.host("h28")


@pytest.fixture(scope="session")
def _plugin_state(lab_host, pytestconfig, harness_timings):
    """(PluginProcess or None, problem or None). Never skips, so that dockerd
    can depend on it: the plugin outlives the session dockerd."""
    available, why = plugin_available()
    if not available:
        yield None, f"fan plugin not available: {why}"
        return
    workdir = Path(tempfile.mkdtemp(prefix="fanlab-plugin-"))
    proc = PluginProcess(lab_host, socket_path=workdir / "fan.sock",
                         state_dir=workdir / "state", log_path=workdir / "plugin.log")
    _holder(pytestconfig)["plugin"] = proc
    try:
        try:
            proc.start()
            harness_timings["plugin start"] = proc.start_seconds
            yield proc, None
        except PluginError as exc:
            yield proc, f"fan plugin failed to start: {exc}"
    finally:
        _holder(pytestconfig).pop("plugin", None)
        proc.close()
        _keep_log(proc.log_path, "plugin.log")
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def plugin(_plugin_state):
    proc, problem = _plugin_state
    if proc is None:
        pytest.skip(problem)
    if problem:
        pytest.fail(problem)
    return proc


@pytest.fixture(scope="session", params=_flavours(), ids=lambda flavour: f"docker-{flavour}")
def docker_flavour(request, root_required, harness_timings) -> str:
    flavour = request.param
    if flavour == "sid":
        try:
            root = sidroot.sid_root()
        except sidroot.SidRootUnavailable as exc:
            pytest.skip(f"docker-sid ({FLAVOURS['sid']}) cannot run here: {exc}")
        harness_timings["docker-sid root (mmdebstrap; 0 = cached)"] = root.build_seconds
    return flavour


@pytest.fixture(scope="session")
def built_plugin() -> Iterator[managed.BuiltPlugin]:
    """The managed plugin as first built from this tree in the session, kept
    for every later dockerd that only needs it installed."""
    built = managed.BuiltPlugin(Path(tempfile.mkdtemp(prefix="fanlab-built-plugin-")))
    try:
        yield built
    finally:
        shutil.rmtree(built.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def dockerd_versions(pytestconfig) -> dict:
    """{flavour: the version its daemon reported}, printed at the end of the run."""
    return _holder(pytestconfig)["versions"]


@pytest.fixture(scope="session")
def dockerd(docker_flavour, lab_host, _plugin_state, pytestconfig, harness_timings,
            dockerd_versions):
    daemon = Dockerd(lab_host, flavour=docker_flavour)
    try:
        daemon.start()
        dockerd_versions[docker_flavour] = daemon.version
        harness_timings[f"dockerd start [{daemon.label}]"] = daemon.start_seconds
        started = time.monotonic()
        ensure_busybox(daemon)
        harness_timings[f"busybox import [{daemon.label}]"] = time.monotonic() - started
        if "busybox" in images.CACHE.build_seconds:
            harness_timings["busybox tarball build"] = images.CACHE.build_seconds["busybox"]
        _holder(pytestconfig)["dockerd"] = daemon
        yield daemon
    finally:
        _holder(pytestconfig).pop("dockerd", None)
        log = daemon.tmpdir / "dockerd.log"
        if os.environ.get("FANLAB_LOGS") and log.exists():
            _keep_log(log, "dockerd.log")    # before close() removes the directory
        try:
            daemon.close()
        finally:
            _start_over_after(daemon, _plugin_state[0])


def _start_over_after(daemon, proc) -> None:
    """The next flavour's dockerd starts empty, so the plugin must too: what
    this daemon left in the plugin (a removal that failed) would refuse every
    later network on the same overlay. Clear it, then fail loudly here."""
    if proc is None:
        return
    state = read_state(proc.state_dir)
    left = sorted(state["networks"]) + sorted(
        pid for pid, pool in state["pools"].items() if not pool.get("unclaimed"))
    if not left:
        return
    tail = proc.log_tail(80)
    proc.stop()
    for name in (STATE_FILE, LAST_GOOD_FILE):
        (proc.state_dir / name).replace(proc.state_dir / f"{name}.left")
    proc.start()     # its restore removes the kernel objects no state accounts for
    pytest.fail(f"{daemon.label} went away leaving networks or pools in the plugin: {left}; "
                f"the plugin starts over empty\nplugin log:\n{tail}")


@pytest.fixture(scope="session")
def busybox(dockerd) -> str:
    return ensure_busybox(dockerd)


@pytest.fixture(autouse=True)
def _revive_session_daemons(request):
    """A test may stop or kill the session plugin or dockerd; the next test
    gets them running again (plugin first: dockerd restores containers)."""
    yield
    holder = _holder(request.config)
    proc, daemon = holder.get("plugin"), holder.get("dockerd")
    if proc is not None and not proc.running:
        proc.start()
    if daemon is not None and not daemon.running:
        daemon.start()
    if "dockerd" in request.fixturenames and proc is not None and daemon is not None:
        _no_network_docker_forgot(proc, daemon)


def _no_network_docker_forgot(proc, daemon) -> None:
    """A fan network the plugin keeps after Docker removed it holds its overlay
    for good: every later test creating that overlay would fail. Name the test
    that left it."""
    kept = set(read_state(proc.state_dir)["networks"])
    if not kept:
        return
    known = set(daemon.cli("network", "ls", "-q", "--no-trunc", "--filter",
                           "driver=fan", timeout=60).stdout.split())
    forgotten = sorted(kept - known)
    if forgotten:
        tail = proc.log_tail(80)
        for network_id in forgotten:    # as Docker should have: the next tests start clean
            proc.call("NetworkDriver.DeleteNetwork", {"NetworkID": network_id})
        pytest.fail(f"the plugin still held fan networks that {daemon.label} removed: "
                    f"{forgotten} (deleted now)\nplugin log:\n{tail}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if E2E_DIR in Path(str(item.fspath)).parents:
        flavour = getattr(item, "callspec", None) and item.callspec.params.get("docker_flavour")
        key = (Path(str(item.fspath)).name, f"docker-{flavour}" if flavour else "-")
        holder = _holder(item.config)
        waited = 0.0
        if report.when == "setup":
            waited = sum(holder["lock_waits"])
            holder["lock_waits"].clear()
        holder["durations"][key] = holder["durations"].get(key, 0.0) + report.duration - waited
    if report.when == "call" and report.failed:
        for name, process in _processes_of(item).items():
            report.sections.append((f"{name} log", process.failure_log()))


def _processes_of(item) -> dict:
    """The dockerds and plugins a test used: its fixtures' values, or what they
    hold as `dockerd` (a lab of a module's own), by fixture name."""
    found: dict = {}
    for name, value in getattr(item, "funcargs", {}).items():
        for label, candidate in ((name, value), (f"{name}.dockerd", getattr(value, "dockerd", None))):
            if isinstance(candidate, ChildProcess) and all(candidate is not p for p in found.values()):
                found[label] = candidate
    return found


def pytest_terminal_summary(terminalreporter, config):
    if HOLDER not in config.stash:
        return
    holder = config.stash[HOLDER]
    write = terminalreporter.write_line
    if holder["versions"]:
        terminalreporter.section("dockerd versions tested")
        for flavour, version in holder["versions"].items():
            write(f"docker-{flavour:5s} {version}  ({FLAVOURS[flavour]})")
    if holder["timings"]:
        terminalreporter.section("fanlab harness timings")
        for what, seconds in holder["timings"].items():
            if seconds is not None:
                write(f"{what:56s} {seconds:7.2f} s")
    if holder["durations"]:
        terminalreporter.section("e2e time per file and dockerd (setup + call + teardown, "
                                 "less waits for the lab lock)")
        for (name, flavour), seconds in sorted(holder["durations"].items()):
            version = holder["versions"].get(flavour.removeprefix("docker-"), "")
            write(f"{name:32s} {flavour:12s} {version:16s} {seconds:8.1f} s")


def pytest_sessionfinish(session, exitstatus):
    images.CACHE.cleanup()


def _keep_log(path: Path, name: str) -> None:
    dest = os.environ.get("FANLAB_LOGS")
    if dest and Path(path).exists():
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(dest) / name)
