"""Fixtures shared by the unit tests."""
import pytest

from fan_driver.ledger import Ledger
from fan_driver.store import Store


@pytest.fixture
def store(tmp_path):
    """A Store over a real state directory in tmp_path, not yet opened."""
    store = Store(tmp_path / "state")
    yield store
    store.close()


@pytest.fixture
def ledger(store):
    """A Ledger over `store`, opened (so locked)."""
    return Ledger(store, store.open())
