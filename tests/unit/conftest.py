"""Fixtures shared by the unit tests."""
import pytest

from fan_driver.ledger import Ledger
from fan_driver.store import Store


@pytest.fixture
def ledger(tmp_path):
    """A Ledger over a real, locked state directory in tmp_path."""
    store = Store(tmp_path)
    ledger = Ledger(store, store.open())
    yield ledger
    store.close()
