"""The state file: atomic saves, loud failures on corruption, the last good state kept
beside it, private files, one serving process per directory, changes from several
processes each seen and none lost."""
import asyncio
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from fan_driver.check.probe import StateInfo, read_state
from fan_driver.errors import FanError
from fan_driver.ledger import Ledger
from fan_driver.model import Endpoint, Network, Owner, Pool, State
from fan_driver.store import LAST_GOOD_FILE, STATE_FILE, Store


def sample_state() -> State:
    pid = "fan:250.0.0.0/8"
    return State(
        pools={pid: Pool(overlay="250.0.0.0/8", underlay="172.30.0.0/16",
                         underlay_address="172.30.0.28", interface="eth0", mtu=1500,
                         host_reserve=3,
                         addresses={"250.0.28.1": Owner.GATEWAY, "250.0.28.4": "e" * 64,
                                    "250.0.28.5": Owner.PENDING},
                         remembered={"web": "250.0.28.7", "db": "250.0.28.4"})},
        networks={"n" * 64: Network(
            pool_id=pid, encap="vxlan", mapping="ebpf", mtu=1450, tc_pref=1, vxlan_port=4790,
            endpoints={"e" * 64: Endpoint(address="250.0.28.4/24",
                                          mac="0e:fa:fa:00:1c:04")})})


def test_open_on_a_new_directory_gives_empty_state(store):
    assert store.open() == State()
    assert store.directory.is_dir()


def test_save_then_load_round_trip(store):
    store.open()
    store.save(sample_state())

    assert store.load() == sample_state()


def test_round_trip_through_a_new_process(store, tmp_path):
    store.open()
    store.save(sample_state())
    store.close()

    again = Store(tmp_path / "state")
    try:
        assert again.open() == sample_state()
    finally:
        again.close()


def test_save_replaces_the_whole_file_and_leaves_no_temporary(store):
    store.open()
    store.save(sample_state())
    store.save(State())

    assert store.load() == State()
    assert sorted(p.name for p in store.directory.iterdir()) == ["lock", STATE_FILE,
                                                                  LAST_GOOD_FILE]
    assert json.loads((store.directory / STATE_FILE).read_text())["version"] == 1


def test_a_save_that_fails_midway_leaves_the_old_file(store):
    store.open()
    store.save(sample_state())
    before = (store.directory / STATE_FILE).read_bytes()
    broken = sample_state()
    broken.pools["fan:250.0.0.0/8"].addresses["250.0.28.9"] = object()   # not JSON

    with pytest.raises(TypeError):
        store.save(broken)

    assert (store.directory / STATE_FILE).read_bytes() == before
    assert (store.directory / LAST_GOOD_FILE).read_bytes() == before
    assert store.load() == sample_state()
    assert sorted(p.name for p in store.directory.iterdir()) == ["lock", STATE_FILE,
                                                                  LAST_GOOD_FILE]


@pytest.mark.parametrize("text", ['{"pools": {', "", "not json", b"\xff\xfe{}"])
def test_corrupt_file_is_a_fan_error_naming_the_file(store, text):
    store.directory.mkdir(parents=True)
    path = store.directory / STATE_FILE
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)

    with pytest.raises(FanError) as err:
        store.open()

    assert "corrupt" in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("text", [
    "[]",
    "null",
    '{"pools": {"fan:250.0.0.0/8": {"overlay": "250.0.0.0/8"}}}',
], ids=["list", "null", "pool-missing-fields"])
def test_json_of_the_wrong_shape_is_reported_as_corrupt(store, text):
    store.directory.mkdir(parents=True)
    (store.directory / STATE_FILE).write_text(text)

    # store.load only turns JSON syntax errors into FanError: these raise
    # AttributeError / TypeError out of State.from_json instead.
    with pytest.raises(FanError, match="corrupt"):
        store.load()


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_directory_and_every_file_are_the_owners_alone(store):
    store.directory.mkdir(parents=True, mode=0o755)
    os.chmod(store.directory, 0o755)    # made before, or by another tool

    store.open()
    store.save(sample_state())

    assert mode(store.directory) == 0o700
    assert {p.name: mode(p) for p in store.directory.iterdir()} == {
        "lock": 0o600, STATE_FILE: 0o600, LAST_GOOD_FILE: 0o600}


def test_a_symlink_planted_where_a_temporary_file_goes_is_not_followed(store, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    store.directory.mkdir(parents=True)
    # the name a save once used, and one of the names it uses now
    (store.directory / "state.tmp").symlink_to(victim)
    (store.directory / f".{STATE_FILE}.x1y2z3.tmp").symlink_to(victim)

    store.open()
    store.save(sample_state())

    assert victim.read_text() == "precious"
    assert not (store.directory / f".{STATE_FILE}.x1y2z3.tmp").is_symlink()
    assert store.load() == sample_state()


def test_a_save_cut_short_leaves_a_temporary_file_that_the_next_open_removes(store):
    store.directory.mkdir(parents=True)
    (store.directory / f".{STATE_FILE}.abc123.tmp").write_text('{"pools": {')

    store.open()

    assert sorted(p.name for p in store.directory.iterdir()) == ["lock"]


def test_the_last_good_state_is_kept_beside_the_file(store):
    store.open()
    store.save(sample_state())
    assert (store.directory / LAST_GOOD_FILE).read_text() == \
        (store.directory / STATE_FILE).read_text()
    store.save(State())
    store.close()
    (store.directory / STATE_FILE).write_text('{"pools": {')   # damaged in place
    path, last_good = store.directory / STATE_FILE, store.directory / LAST_GOOD_FILE

    with pytest.raises(FanError) as err:
        Store(store.directory).open()

    message = str(err.value)
    assert str(path) in message and f"copy {last_good}" in message
    assert "Nothing in the kernel was changed" in message
    last_good.replace(path)
    assert Store(store.directory).load() == State()


def test_a_missing_file_with_its_last_good_copy_beside_it_is_refused(store):
    store.open()
    store.save(sample_state())
    store.close()
    (store.directory / STATE_FILE).unlink()

    with pytest.raises(FanError) as err:
        Store(store.directory).open()

    assert "is missing" in str(err.value)
    assert str(store.directory / LAST_GOOD_FILE) in str(err.value)


def test_second_open_on_the_same_directory_is_refused_while_the_first_holds_it(store):
    store.open()
    second = Store(store.directory)

    with pytest.raises(FanError) as err:
        second.open()

    assert "another fan-driver is already using state directory" in str(err.value)
    assert str(store.directory) in str(err.value)


def test_directory_can_be_opened_again_after_close(store):
    store.open()
    store.close()
    second = Store(store.directory)
    try:
        assert second.open() == State()
    finally:
        second.close()


def test_the_remembered_order_survives_the_file(store):
    store.open()
    store.save(sample_state())

    assert list(store.load().pools["fan:250.0.0.0/8"].remembered) == ["web", "db"]


def test_files_from_before_owners_had_names_and_before_memory_still_load(store):
    old = {"version": 1, "networks": {}, "pools": {"fan:250.0.0.0/8": {
        "overlay": "250.0.0.0/8", "underlay": "172.30.0.0/16", "underlay_address": "172.30.0.28",
        "interface": "eth0", "mtu": 1500, "host_reserve": 1, "unclaimed": False,
        "addresses": {"250.0.28.1": "gateway", "250.0.28.2": "", "250.0.28.3": "unclaimed"}}}}
    store.directory.mkdir(parents=True)
    (store.directory / STATE_FILE).write_text(json.dumps(old))

    pool = store.open().pools["fan:250.0.0.0/8"]

    assert pool.addresses == {"250.0.28.1": Owner.GATEWAY, "250.0.28.2": Owner.PENDING,
                              "250.0.28.3": Owner.UNCLAIMED}
    assert pool.remembered == {}


@pytest.mark.parametrize("encap, mapping, port", [
    ("vxlan", "ebpf", 4789), ("vxlan", "kernel", 4789), ("vxlan", "routes", 8472),
    ("ipip", "ebpf", None), ("ipip", "routes", None)])
def test_networks_from_before_the_vxlan_port_keep_the_port_they_were_made_with(
        store, encap, mapping, port):
    old = {"version": 1, "pools": {}, "networks": {"n" * 64: {
        "pool_id": "fan:250.0.0.0/8", "encap": encap, "mapping": mapping, "mtu": 1450,
        "tc_pref": 1, "internal": False, "receive": "tunnel", "endpoints": {}}}}
    store.directory.mkdir(parents=True)
    (store.directory / STATE_FILE).write_text(json.dumps(old))

    assert store.open().networks["n" * 64].vxlan_port == port


def test_a_networks_vxlan_port_survives_the_file(store):
    store.open()
    store.save(sample_state())
    assert Store(store.directory).load().networks["n" * 64].vxlan_port == 4790


def file_identity(store) -> tuple:
    st = (store.directory / STATE_FILE).stat()
    return st.st_ino, st.st_mtime_ns


def test_saving_what_the_file_holds_does_not_write(store):
    store.open()
    store.save(sample_state())
    before = file_identity(store)

    store.save(sample_state())
    store.close()
    again = Store(store.directory)
    try:
        again.save(again.open())
    finally:
        again.close()

    assert file_identity(store) == before


def test_a_file_in_an_older_form_is_rewritten_at_the_first_save(store):
    store.directory.mkdir(parents=True)
    (store.directory / STATE_FILE).write_text(json.dumps(State().to_json(), indent=1))
    before = file_identity(store)

    store.save(store.open())

    assert file_identity(store)[0] != before[0]
    assert store.load() == State()


def test_a_file_without_a_version_is_version_1(store):
    data = {k: v for k, v in sample_state().to_json().items() if k != "version"}
    store.directory.mkdir(parents=True)
    (store.directory / STATE_FILE).write_text(json.dumps(data))

    assert store.load() == sample_state()


def test_a_file_of_a_newer_version_is_refused_naming_file_version_and_fix(store):
    store.directory.mkdir(parents=True)
    path = store.directory / STATE_FILE
    path.write_text(json.dumps(dict(State().to_json(), version=2)))

    with pytest.raises(FanError) as err:
        store.open()

    message = str(err.value)
    assert str(path) in message and "version 2" in message
    assert "a newer fan-driver wrote it" in message and "corrupt" not in message
    assert json.loads(path.read_text())["version"] == 2   # left as it was


@pytest.mark.parametrize("version", [0, "1", None, 1.5, True])
def test_a_version_that_no_fan_driver_writes_is_corrupt(store, version):
    store.directory.mkdir(parents=True)
    (store.directory / STATE_FILE).write_text(json.dumps(dict(State().to_json(), version=version)))

    with pytest.raises(FanError, match="corrupt"):
        store.load()


# --- two processes changing the state -------------------------------------------------

def take(state: State, address: str, owner: str) -> None:
    """Hand out one address of sample_state's pool."""
    state.pools["fan:250.0.0.0/8"].addresses[address] = owner


async def test_two_stores_changing_in_turn_see_each_others_changes(store):
    first = Ledger(store, store.open())
    async with first.change() as state:
        state.pools.update(sample_state().pools)
    other = Store(store.directory)
    second = Ledger(other, other.load())

    async with second.change() as state:
        take(state, "250.0.28.10", "second")
    async with first.change() as state:
        assert state.pools["fan:250.0.0.0/8"].addresses["250.0.28.10"] == "second"
        take(state, "250.0.28.11", "first")
    async with second.read() as state:
        assert state.pools["fan:250.0.0.0/8"].addresses["250.0.28.11"] == "first"

    addresses = store.load().pools["fan:250.0.0.0/8"].addresses
    assert (addresses["250.0.28.10"], addresses["250.0.28.11"]) == ("second", "first")


CHANGER = """
import asyncio, sys
from pathlib import Path
from fan_driver.ledger import Ledger
from fan_driver.store import Store

async def main(directory, count):
    store = Store(Path(directory))
    ledger = Ledger(store, store.load())
    for n in range(count):
        async with ledger.change() as state:
            state.pools["fan:250.0.0.0/8"].addresses[f"250.0.29.{n}"] = "subprocess"
            await asyncio.sleep(0.001)   # hold the lock across an await, as drivers do

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_a_process_changing_at_the_same_time_loses_no_change(store):
    ledger = Ledger(store, store.open())
    async with ledger.change() as state:
        state.pools.update(sample_state().pools)
    count = 100
    other = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHANGER, str(store.directory), str(count),
        cwd=Path(__file__).resolve().parents[2])

    for n in range(count):
        async with ledger.change() as state:
            take(state, f"250.0.30.{n}", "here")
            await asyncio.sleep(0.001)
    assert await other.wait() == 0

    addresses = store.load().pools["fan:250.0.0.0/8"].addresses
    assert sum(owner == "subprocess" for owner in addresses.values()) == count
    assert sum(owner == "here" for owner in addresses.values()) == count
    async with ledger.read() as state:
        assert state.pools["fan:250.0.0.0/8"].addresses == addresses


def test_check_reads_the_state_as_serve_does(store):
    """fan-driver check reads the state once, and refuses what serve refuses:
    a missing file beside its last good copy is an error, not "no state"."""
    assert read_state(store.directory) == (None, StateInfo(str(store.directory), exists=False))
    store.open()
    store.save(sample_state())
    store.close()
    stored, info = read_state(store.directory)
    assert stored == sample_state() and len(info.networks) == 1 and not info.error
    (store.directory / STATE_FILE).unlink()

    stored, info = read_state(store.directory)

    assert stored is None and "is missing" in info.error
