"""Session fixtures for end-to-end tests (see tests/harness/).

    root_required   skips, naming what is missing, unless root with ip, dockerd...
    lab             one Lab: host `fanlab-h28` (172.30.0.28/16, default route via
                    the outside) and `fanlab-outside` (172.30.255.254/16)
    lab_host        lab.host("h28")
    plugin          the fan plugin (PluginProcess) in fanlab-h28; skips when
                    `python -m fan_driver serve --help` fails, fails when it
                    does not start. dockerd finds it as `fan` (-d fan --ipam-driver fan)
    dockerd         one Dockerd in fanlab-h28 with image `busybox`
    busybox         the image name ("busybox")

The plugin process is started before dockerd and stopped after it (so dockerd's
teardown can still remove fan networks); after each test, a session dockerd or
plugin that the test stopped is started again. A failed e2e test's report
carries the tail of both logs. FANLAB_LOGS=<dir> keeps copies of the logs.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.harness import (Dockerd, Lab, PluginError, PluginProcess, ensure_busybox,
                           missing_requirements, plugin_available)
from tests.harness import images

E2E_DIR = Path(__file__).resolve().parent / "e2e"
HOLDER = pytest.StashKey[dict]()


def _holder(config) -> dict:
    if HOLDER not in config.stash:
        config.stash[HOLDER] = {"timings": {}}
    return config.stash[HOLDER]


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
def lab(root_required, harness_timings):
    started = time.monotonic()
    lab = Lab()
    try:
        lab.add_host("h28", "172.30.0.28/16")
        lab.add_outside("172.30.255.254/16")
        harness_timings["lab lock wait (another run)"] = lab.lock_wait_seconds
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


@pytest.fixture(scope="session")
def dockerd(lab_host, _plugin_state, pytestconfig, harness_timings):
    daemon = Dockerd(lab_host)
    try:
        daemon.start()
        harness_timings["dockerd start"] = daemon.start_seconds
        started = time.monotonic()
        ensure_busybox(daemon)
        harness_timings["busybox import (incl. tarball build)"] = time.monotonic() - started
        if "busybox" in images.CACHE.build_seconds:
            harness_timings["busybox tarball build"] = images.CACHE.build_seconds["busybox"]
        _holder(pytestconfig)["dockerd"] = daemon
        yield daemon
    finally:
        _holder(pytestconfig).pop("dockerd", None)
        log = daemon.tmpdir / "dockerd.log"
        if os.environ.get("FANLAB_LOGS") and log.exists():
            _keep_log(log, "dockerd.log")    # before close() removes the directory
        daemon.close()


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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed or HOLDER not in item.config.stash:
        return
    holder = item.config.stash[HOLDER]
    for key in ("dockerd", "plugin"):
        if holder.get(key) is not None:
            report.sections.append((f"{key} log tail", holder[key].log_tail(60)))


def pytest_terminal_summary(terminalreporter, config):
    timings = config.stash[HOLDER]["timings"] if HOLDER in config.stash else {}
    if timings:
        terminalreporter.section("fanlab harness timings")
        for what, seconds in timings.items():
            if seconds is not None:
                terminalreporter.write_line(f"{what:40s} {seconds:6.2f} s")


def pytest_sessionfinish(session, exitstatus):
    images.CACHE.cleanup()


def _keep_log(path: Path, name: str) -> None:
    dest = os.environ.get("FANLAB_LOGS")
    if dest and Path(path).exists():
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(dest) / name)
