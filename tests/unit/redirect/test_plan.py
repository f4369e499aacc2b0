"""Planning: what differs between the desired and the installed capture state, and nothing more."""

from __future__ import annotations

import dataclasses
from ipaddress import ip_address

import pytest

from agent.redirect.plan import InstalledRedirect, Plan, plan, plan_pods
from agent.redirect.ruleset import (
    DesiredRedirect,
    InstalledTable,
    LocalRoute,
    PodIp,
    PolicyRule,
    TableShape,
    build,
)
from agent.settings import PortSettings, RedirectSettings


def pods(*addresses: str) -> frozenset[PodIp]:
    return frozenset(ip_address(a) for a in addresses)


DESIRED = build(RedirectSettings(), PortSettings(), pods("10.1.0.5", "10.1.0.6", "fd01::5"))
RULE_V4 = PolicyRule(4, 32000, 0x111, 0xFFF, 100)
RULE_V6 = PolicyRule(6, 32000, 0x111, 0xFFF, 100)
FWMARK_ACCEPT = "net.ipv4.tcp_fwmark_accept"
SRC_VALID_MARK = "net.ipv4.conf.all.src_valid_mark"
GOOD_SYSCTLS = {FWMARK_ACCEPT: "0", SRC_VALID_MARK: "0"}


def matching(desired: DesiredRedirect = DESIRED) -> InstalledRedirect:
    return InstalledRedirect(
        table=InstalledTable(shape=desired.shape, pod_ips=desired.pod_ips),
        policy_rules=desired.policy_rules,
        local_routes=desired.local_routes,
        sysctls=GOOD_SYSCTLS,
    )


def test_a_matching_node_needs_nothing() -> None:
    change = plan(DESIRED, matching())
    assert change.empty
    assert change == Plan()
    assert change.describe("ambient_agent") == []


def test_a_bare_node_needs_everything() -> None:
    bare = InstalledRedirect(
        table=None, policy_rules=frozenset(), local_routes=frozenset(), sysctls=GOOD_SYSCTLS
    )
    change = plan(DESIRED, bare)
    assert change.replace_table
    assert change.add_rules == {RULE_V4, RULE_V6}
    assert change.add_routes == {LocalRoute(4, 100), LocalRoute(6, 100)}
    # The replace writes the elements itself.
    assert (change.add_pods, change.remove_pods) == (frozenset(), frozenset())
    assert change.describe("ambient_agent") == [
        "add IPv4 route local default dev lo table 100",
        "add IPv6 route local default dev lo table 100",
        "add IPv4 rule 32000: fwmark 0x111/0xfff lookup 100",
        "add IPv6 rule 32000: fwmark 0x111/0xfff lookup 100",
        "replace table inet ambient_agent",
    ]


@pytest.mark.parametrize(
    ("installed", "expected"),
    [
        (
            dataclasses.replace(matching(), table=InstalledTable(shape=None, pod_ips=DESIRED.pod_ips)),
            Plan(replace_table=True),
        ),
        (
            dataclasses.replace(
                matching(),
                table=InstalledTable(
                    shape=TableShape(
                        DESIRED.shape.chain_hook, DESIRED.shape.sets, DESIRED.shape.rule_comments[1:]
                    ),
                    pod_ips=DESIRED.pod_ips,
                ),
            ),
            Plan(replace_table=True),
        ),
        (
            dataclasses.replace(matching(), policy_rules=frozenset({RULE_V6})),
            Plan(add_rules=frozenset({RULE_V4})),
        ),
        (
            dataclasses.replace(matching(), local_routes=frozenset({LocalRoute(4, 100)})),
            Plan(add_routes=frozenset({LocalRoute(6, 100)})),
        ),
        (
            dataclasses.replace(
                matching(),
                policy_rules=frozenset({RULE_V4, RULE_V6, dataclasses.replace(RULE_V4, priority=100)}),
            ),
            Plan(remove_rules=frozenset({dataclasses.replace(RULE_V4, priority=100)})),
        ),
        (
            dataclasses.replace(
                matching(), table=InstalledTable(DESIRED.shape, pods("10.1.0.5", "10.9.9.9"))
            ),
            Plan(add_pods=pods("10.1.0.6", "fd01::5"), remove_pods=pods("10.9.9.9")),
        ),
    ],
    ids=["table-unknown-shape", "rule-deleted", "ip-rule-deleted", "route-deleted", "stale-rule", "elements"],
)
def test_drift_is_repaired_by_exactly_the_missing_changes(
    installed: InstalledRedirect, expected: Plan
) -> None:
    assert plan(DESIRED, installed) == expected


@pytest.mark.parametrize(
    ("current", "written"),
    [
        ({FWMARK_ACCEPT: "1", SRC_VALID_MARK: "0"}, [FWMARK_ACCEPT]),
        ({FWMARK_ACCEPT: "0", SRC_VALID_MARK: "1"}, [SRC_VALID_MARK]),
        ({FWMARK_ACCEPT: None, SRC_VALID_MARK: "0"}, []),
    ],
    ids=["fwmark-accept-on", "src-valid-mark-on", "setting-absent-from-kernel"],
)
def test_sysctls_are_written_only_when_wrong(current: dict[str, str | None], written: list[str]) -> None:
    change = plan(DESIRED, dataclasses.replace(matching(), sysctls=current))
    assert [s.name for s in change.write_sysctls] == written
    assert [s.value for s in change.write_sysctls] == ["0"] * len(written)


def test_pod_updates_alone_diff_the_elements() -> None:
    change = plan_pods(pods("10.1.0.5", "fd01::6"), pods("10.1.0.5", "10.1.0.6"))
    assert change == Plan(add_pods=pods("fd01::6"), remove_pods=pods("10.1.0.6"))
    assert change.describe("ambient_agent") == ["remove pod 10.1.0.6", "add pod fd01::6"]
    assert plan_pods(pods("10.1.0.5"), pods("10.1.0.5")).empty
