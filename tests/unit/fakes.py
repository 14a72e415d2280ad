"""Small fakes of the declared interfaces (fan_driver/dataplane/base.py).

Each subclasses its protocol and defines every method explicitly, so a method
renamed in the protocol leaves the fake abstract (it cannot be made) and a call
to a method the protocol lacks fails with AttributeError; test_interfaces.py
also compares their methods and signatures with the protocol's.
"""
from __future__ import annotations

from fan_driver.dataplane.base import Dataplane


class FakeDataplane(Dataplane):
    """Records each call as (method, positional arguments)."""

    def __init__(self):
        self.calls = []

    def _record(self, name, *args):
        self.calls.append((name, args))

    async def ensure_network(self, plan, undo_on_failure=True):
        self._record("ensure_network", plan)

    async def reattach(self, plan, endpoints):
        self._record("reattach", plan, endpoints)

    async def ensure_rules(self, plan):
        self._record("ensure_rules", plan)

    async def remove_network(self, plan, endpoint_ids):
        self._record("remove_network", plan, endpoint_ids)

    async def attach(self, plan, endpoint_id, endpoint):
        self._record("attach", plan, endpoint_id, endpoint)

    def forget(self, plan, endpoint):
        self._record("forget", plan, endpoint)

    async def detach(self, endpoint_id):
        self._record("detach", endpoint_id)

    async def publish(self, plan, endpoint_id, container, requests, held):
        self._record("publish", plan, endpoint_id, container, requests, held)
        return ()

    async def unpublish(self, plan, endpoint_id, bindings):
        self._record("unpublish", plan, endpoint_id, bindings)

    async def restore_ports(self, plan, endpoint_id, container, bindings):
        self._record("restore_ports", plan, endpoint_id, container, bindings)

    async def remove_orphans(self, plans, endpoint_ids, published=frozenset()):
        self._record("remove_orphans", plans, endpoint_ids, published)
