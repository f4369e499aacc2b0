"""The reconciler and its loop against an in-memory kernel: idempotence, incremental updates, repair,
retries with backoff; and cleanup.

The in-memory nftables below applies the agent's JSON commands the way nft does for the subset the
agent uses (transactions, errors on deleting what is missing) and lists tables in nft's JSON form;
the real adapters run against the kernel in tests/e2e/test_redirect.py.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any

import pytest

from agent.redirect.cleanup import remove_redirection
from agent.redirect.errors import NftError, RedirectError, RoutingError
from agent.redirect.reconciler import ReconcileLoop, RedirectReconciler
from agent.redirect.ruleset import LocalRoute, NftCommand, PodIp, PolicyRule
from agent.retry import Backoff
from agent.settings import PortSettings, RedirectSettings

SETTINGS = RedirectSettings()


def pods(*addresses: str) -> frozenset[PodIp]:
    return frozenset(ip_address(a) for a in addresses)


@dataclass
class Table:
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    chains: dict[str, dict[str, Any]] = field(default_factory=dict)
    rules: list[str] = field(default_factory=list)


class MemoryNftables:
    def __init__(self) -> None:
        self.tables: dict[str, Table] = {}
        self.batches: list[list[NftCommand]] = []
        self.reads = 0
        self.failures_left = 0

    def apply(self, commands: Sequence[NftCommand]) -> None:
        if self.failures_left:
            self.failures_left -= 1
            raise NftError("nft -j -f - exited 1: injected failure")
        staged = copy.deepcopy(self.tables)
        for command in commands:
            ((verb, body),) = command.items()
            ((kind, obj),) = body.items()
            self._run(staged, verb, kind, obj)
        self.tables = staged
        self.batches.append(list(commands))

    def _run(self, tables: dict[str, Table], verb: str, kind: str, obj: dict[str, Any]) -> None:
        if kind == "table":
            if verb == "add":
                tables.setdefault(obj["name"], Table())
            elif tables.pop(obj["name"], None) is None:
                raise NftError("delete table: No such file or directory")
            return
        table = tables.get(obj["table"])
        if table is None:
            raise NftError(f"{verb} {kind}: No such file or directory")
        if kind == "set":
            table.sets[obj["name"]] = {"type": obj["type"], "elem": set()}
        elif kind == "chain":
            table.chains[obj["name"]] = {
                k: v for k, v in obj.items() if k in ("type", "hook", "prio", "policy")
            }
        elif kind == "rule":
            table.rules.append(obj["comment"])
        elif kind == "element":
            elements: set[str] = table.sets[obj["name"]]["elem"]
            if verb == "add":
                elements.update(obj["elem"])
            elif not elements.issuperset(obj["elem"]):
                raise NftError("delete element: No such file or directory")
            else:
                elements.difference_update(obj["elem"])

    def list_table(self, table: str) -> Mapping[str, Any] | None:
        self.reads += 1
        found = self.tables.get(table)
        if found is None:
            return None
        ref = {"family": "inet", "table": table}
        items: list[dict[str, Any]] = [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": table}},
        ]
        for name, s in found.sets.items():
            body = {**ref, "name": name, "type": s["type"]}
            if s["elem"]:
                body["elem"] = sorted(s["elem"])
            items.append({"set": body})
        items += [{"chain": {**ref, "name": name, **attrs}} for name, attrs in found.chains.items()]
        items += [{"rule": {**ref, "chain": "prerouting", "comment": c, "expr": []}} for c in found.rules]
        return {"nftables": items}

    def elements(self) -> set[str]:
        table = self.tables[SETTINGS.table_name]
        return set().union(*(s["elem"] for s in table.sets.values()))


class MemoryRouting:
    def __init__(self) -> None:
        self.policy_rules: set[PolicyRule] = set()
        self.routes: set[LocalRoute] = set()
        self.changes = 0

    def rules(self, family: int, table: int, fwmark: int, fwmask: int) -> frozenset[PolicyRule]:
        return frozenset(
            r
            for r in self.policy_rules
            if (r.family, r.table, r.fwmark, r.fwmask) == (family, table, fwmark, fwmask)
        )

    def add_rule(self, rule: PolicyRule) -> None:
        self.changes += 1
        self.policy_rules.add(rule)

    def delete_rule(self, rule: PolicyRule) -> None:
        self.changes += 1
        self.policy_rules.discard(rule)

    def local_routes(self, family: int, table: int) -> frozenset[LocalRoute]:
        return frozenset(r for r in self.routes if (r.family, r.table) == (family, table))

    def add_route(self, route: LocalRoute) -> None:
        self.changes += 1
        self.routes.add(route)

    def delete_route(self, route: LocalRoute) -> None:
        self.changes += 1
        self.routes.discard(route)


class MemorySysctls:
    def __init__(self, ipv6: bool = True) -> None:
        self.values = {"net.ipv4.tcp_fwmark_accept": "0", "net.ipv4.conf.all.src_valid_mark": "0"}
        self.ipv6 = ipv6

    def read(self, name: str) -> str | None:
        return self.values.get(name)

    def write(self, name: str, value: str) -> None:
        self.values[name] = value

    def ipv6_available(self) -> bool:
        return self.ipv6


@dataclass
class Node:
    nftables: MemoryNftables = field(default_factory=MemoryNftables)
    routing: MemoryRouting = field(default_factory=MemoryRouting)
    sysctls: MemorySysctls = field(default_factory=MemorySysctls)

    def reconciler(self, settings: RedirectSettings = SETTINGS) -> RedirectReconciler:
        return RedirectReconciler(settings, PortSettings(), self.nftables, self.routing, self.sysctls)


def only_elements(batch: list[NftCommand]) -> bool:
    return all(set(next(iter(command.values()))) == {"element"} for command in batch)


def test_first_pass_installs_everything_and_the_second_changes_nothing() -> None:
    node = Node()
    reconciler = node.reconciler()
    first = reconciler.reconcile(pods("10.1.0.5", "fd01::5"))
    assert first.replace_table
    assert node.nftables.elements() == {"10.1.0.5", "fd01::5"}
    assert len(node.routing.policy_rules) == 2
    assert len(node.routing.routes) == 2
    batches, changes = len(node.nftables.batches), node.routing.changes

    second = node.reconciler().reconcile(pods("10.1.0.5", "fd01::5"))
    assert second.empty
    assert (len(node.nftables.batches), node.routing.changes) == (batches, changes)


def test_pod_updates_change_only_elements_without_reading() -> None:
    node = Node()
    reconciler = node.reconciler()
    reconciler.reconcile(pods("10.1.0.5"))
    reads = node.nftables.reads

    change = reconciler.update_pods(pods("10.1.0.5", "10.1.0.6", "fd01::6"))
    change_back = reconciler.update_pods(pods("10.1.0.5", "fd01::6"))

    assert node.nftables.reads == reads
    assert change.add_pods == pods("10.1.0.6", "fd01::6")
    assert change_back.remove_pods == pods("10.1.0.6")
    assert node.nftables.elements() == {"10.1.0.5", "fd01::6"}
    assert len(node.nftables.batches) == 3
    assert all(only_elements(batch) for batch in node.nftables.batches[1:])


def test_a_pod_update_before_any_full_pass_runs_one() -> None:
    node = Node()
    change = node.reconciler().update_pods(pods("10.1.0.5"))
    assert change.replace_table
    assert node.nftables.elements() == {"10.1.0.5"}


def test_a_failed_element_update_falls_back_to_a_full_pass() -> None:
    node = Node()
    reconciler = node.reconciler()
    reconciler.reconcile(pods("10.1.0.5"))
    del node.nftables.tables[SETTINGS.table_name]

    change = reconciler.update_pods(pods("10.1.0.5", "10.1.0.6"))

    assert change.replace_table
    assert node.nftables.elements() == {"10.1.0.5", "10.1.0.6"}


@pytest.mark.parametrize(
    ("drift", "repaired"),
    [
        (lambda n: n.nftables.tables.clear(), lambda n: SETTINGS.table_name in n.nftables.tables),
        (
            lambda n: n.nftables.tables[SETTINGS.table_name].rules.pop(2),
            lambda n: len(n.nftables.tables[SETTINGS.table_name].rules) == 12,
        ),
        (lambda n: n.routing.policy_rules.clear(), lambda n: len(n.routing.policy_rules) == 2),
        (lambda n: n.routing.routes.clear(), lambda n: len(n.routing.routes) == 2),
        (
            lambda n: n.sysctls.write("net.ipv4.conf.all.src_valid_mark", "1"),
            lambda n: n.sysctls.read("net.ipv4.conf.all.src_valid_mark") == "0",
        ),
    ],
    ids=["table-deleted", "rule-deleted", "ip-rules-deleted", "routes-deleted", "sysctl-changed"],
)
def test_a_full_pass_repairs_drift(
    drift: Callable[[Node], object], repaired: Callable[[Node], object]
) -> None:
    node = Node()
    reconciler = node.reconciler()
    reconciler.reconcile(pods("10.1.0.5"))
    drift(node)
    assert not reconciler.reconcile(pods("10.1.0.5")).empty
    assert repaired(node)
    assert reconciler.reconcile(pods("10.1.0.5")).empty
    assert node.nftables.elements() == {"10.1.0.5"}


def test_a_changed_rule_priority_moves_the_rule() -> None:
    node = Node()
    node.reconciler().reconcile(pods("10.1.0.5"))
    change = node.reconciler(RedirectSettings(rule_priority=100)).reconcile(pods("10.1.0.5"))
    assert {r.priority for r in change.add_rules} == {100}
    assert {r.priority for r in change.remove_rules} == {32000}
    assert {r.priority for r in node.routing.policy_rules} == {100}


def test_without_ipv6_no_ipv6_routing_is_installed() -> None:
    node = Node(sysctls=MemorySysctls(ipv6=False))
    node.reconciler().reconcile(pods("10.1.0.5", "fd01::5"))
    assert {r.family for r in node.routing.policy_rules} == {4}
    assert {r.family for r in node.routing.routes} == {4}
    assert node.nftables.elements() == {"10.1.0.5"}


def test_after_a_failed_pass_the_next_pod_update_reads_again() -> None:
    node = Node()
    reconciler = node.reconciler()
    reconciler.reconcile(pods("10.1.0.5"))
    node.nftables.failures_left = 1
    node.nftables.tables[SETTINGS.table_name].rules.pop()
    with pytest.raises(NftError):
        reconciler.reconcile(pods("10.1.0.5"))
    reads = node.nftables.reads
    assert reconciler.update_pods(pods("10.1.0.5")).replace_table
    assert node.nftables.reads > reads


async def eventually(condition: Callable[[], object]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)


class FailingRouting(MemoryRouting):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures_left = failures

    def add_route(self, route: LocalRoute) -> None:
        if self.failures_left:
            self.failures_left -= 1
            raise RoutingError("add route: injected failure")
        super().add_route(route)


async def test_the_loop_retries_failures_with_exponential_backoff() -> None:
    node = Node(routing=FailingRouting(failures=3))
    delays: list[float] = []

    async def record(delay: float) -> None:
        delays.append(delay)

    settings = RedirectSettings(retry_initial_delay=0.25, retry_max_delay=0.75)
    backoff = Backoff(base_s=settings.retry_initial_delay, cap_s=settings.retry_max_delay, jitter=False)
    observed: list[RedirectError] = []
    loop = ReconcileLoop(
        node.reconciler(settings), settings, sleep=record, backoff=backoff, on_failure=observed.append
    )
    loop.enrol(pods("10.1.0.5"))
    task = asyncio.create_task(loop.run())
    try:
        await eventually(lambda: loop.status.synced_pods == pods("10.1.0.5"))
    finally:
        task.cancel()
    assert delays == [0.25, 0.5, 0.75]
    assert [str(error) for error in observed] == ["add route: injected failure"] * 3
    assert loop.status.consecutive_failures == 0
    assert loop.status.last_error is None
    assert node.nftables.elements() == {"10.1.0.5"}


async def test_the_loop_reports_failures_while_they_last() -> None:
    node = Node(routing=FailingRouting(failures=1_000_000))
    gate = asyncio.Event()

    async def wait_for_gate(_: float) -> None:
        await gate.wait()

    loop = ReconcileLoop(node.reconciler(), SETTINGS, sleep=wait_for_gate)
    loop.enrol(pods("10.1.0.5"))
    task = asyncio.create_task(loop.run())
    try:
        await eventually(lambda: loop.status.consecutive_failures == 1)
        assert loop.status.synced_pods is None
        assert "injected failure" in (loop.status.last_error or "")
    finally:
        task.cancel()


async def test_the_loop_applies_pod_changes_incrementally_and_repairs_drift() -> None:
    node = Node()
    settings = RedirectSettings(drift_check_interval=0.05)
    loop = ReconcileLoop(node.reconciler(settings), settings)
    loop.enrol(pods("10.1.0.5"))
    task = asyncio.create_task(loop.run())
    try:
        await eventually(lambda: loop.status.synced_pods == pods("10.1.0.5"))
        loop.enrol(pods("10.1.0.5", "10.1.0.6"))
        await eventually(lambda: loop.status.synced_pods == pods("10.1.0.5", "10.1.0.6"))
        assert node.nftables.elements() == {"10.1.0.5", "10.1.0.6"}
        assert only_elements(node.nftables.batches[-1])

        node.nftables.tables.clear()
        node.routing.policy_rules.clear()
        await eventually(
            lambda: SETTINGS.table_name in node.nftables.tables and len(node.routing.policy_rules) == 2
        )
        assert node.nftables.elements() == {"10.1.0.5", "10.1.0.6"}
    finally:
        task.cancel()


def test_cleanup_removes_what_the_reconciler_installed_and_is_safe_to_repeat() -> None:
    node = Node()
    node.reconciler().reconcile(pods("10.1.0.5", "fd01::5"))
    node.routing.add_rule(PolicyRule(4, 100, 0x111, 0xFFF, 100))

    removed = remove_redirection(SETTINGS, node.nftables, node.routing, node.sysctls)

    assert removed == [
        "table inet ambient_agent",
        "IPv4 rule 100: fwmark 0x111/0xfff lookup 100",
        "IPv4 rule 32000: fwmark 0x111/0xfff lookup 100",
        "IPv6 rule 32000: fwmark 0x111/0xfff lookup 100",
        "IPv4 route local default dev lo table 100",
        "IPv6 route local default dev lo table 100",
    ]
    assert (node.nftables.tables, node.routing.policy_rules, node.routing.routes) == ({}, set(), set())
    assert remove_redirection(SETTINGS, node.nftables, node.routing, node.sysctls) == []


def test_cleanup_on_a_node_that_never_ran_the_agent_removes_nothing() -> None:
    node = Node()
    assert remove_redirection(SETTINGS, node.nftables, node.routing, node.sysctls) == []
    assert node.nftables.batches == []
