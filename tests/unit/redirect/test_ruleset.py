"""The desired capture state: rule order and contents, routing, the nft transactions, listing parsing."""

from __future__ import annotations

import json
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from agent.redirect.ruleset import (
    CHAIN_PRIORITY,
    SET_V4,
    SET_V6,
    LocalRoute,
    NftRule,
    PodIp,
    PolicyRule,
    build,
    delete_table_commands,
    element_commands,
    parse_table_listing,
    replace_table_commands,
)
from agent.settings import PortSettings, RedirectSettings

SETTINGS = RedirectSettings()
PORTS = PortSettings()
POD_V4 = ip_address("10.1.0.5")
POD_V6 = ip_address("fd01::5")
# `nft -j list table inet ambient_agent` from nftables 1.0.6 after `ambient-agent redirect apply
# --pod-ip 10.1.0.5 --pod-ip fd01::5` with default settings (some counters are non-zero).
LISTING = json.loads((Path(__file__).parent / "nft_1_0_6_listing.json").read_text())


def pods(*addresses: str) -> frozenset[PodIp]:
    return frozenset(ip_address(a) for a in addresses)


def rule(name: str, settings: RedirectSettings = SETTINGS, ports: PortSettings = PORTS) -> NftRule:
    rules = {r.name: r for r in build(settings, ports, frozenset()).rules}
    return rules[name]


def statements(r: NftRule, key: str) -> list[Any]:
    return [s[key] for s in r.expr if key in s]


def matched(r: NftRule) -> dict[str, Any]:
    """What each match compares, keyed by a readable form of its left-hand side."""
    result = {}
    for m in statements(r, "match"):
        left = m["left"]
        if "payload" in left:
            key = f"{left['payload']['protocol']} {left['payload']['field']}"
        elif "&" in left:
            key = "tcp flags"
        else:
            (kind, body), *_ = left.items()
            key = f"{kind} {body['key']}"
        result[key] = m["right"]
    return result


def test_rules_follow_the_verified_order() -> None:
    names = [r.name for r in build(SETTINGS, PORTS, frozenset()).rules]
    assert names == [
        "agent transparent socket",
        "agent upstream socket",
        "inbound hbone ip",
        "inbound hbone ip6",
        "outbound ip",
        "outbound ip6",
        "inbound plaintext ip",
        "inbound plaintext ip6",
        "refuse outbound ip",
        "refuse outbound ip6",
        "refuse inbound ip",
        "refuse inbound ip6",
    ]


@pytest.mark.parametrize(
    ("name", "matches", "tproxy"),
    [
        (
            "agent transparent socket",
            {"meta l4proto": "tcp", "socket transparent": 1, "socket wildcard": 0},
            None,
        ),
        ("agent upstream socket", {"meta l4proto": "tcp", "socket mark": 0x539}, None),
        (
            "inbound hbone ip",
            {"meta l4proto": "tcp", "ip daddr": f"@{SET_V4}", "tcp dport": 15008},
            {"family": "ip", "port": 15008},
        ),
        (
            "inbound hbone ip6",
            {"meta l4proto": "tcp", "ip6 daddr": f"@{SET_V6}", "tcp dport": 15008},
            {"family": "ip6", "port": 15008},
        ),
        ("outbound ip", {"meta l4proto": "tcp", "ip saddr": f"@{SET_V4}"}, {"family": "ip", "port": 15001}),
        (
            "outbound ip6",
            {"meta l4proto": "tcp", "ip6 saddr": f"@{SET_V6}"},
            {"family": "ip6", "port": 15001},
        ),
        (
            "inbound plaintext ip",
            {"meta l4proto": "tcp", "ip daddr": f"@{SET_V4}"},
            {"family": "ip", "port": 15006},
        ),
        (
            "inbound plaintext ip6",
            {"meta l4proto": "tcp", "ip6 daddr": f"@{SET_V6}"},
            {"family": "ip6", "port": 15006},
        ),
        ("refuse outbound ip", {"meta l4proto": "tcp", "ip saddr": f"@{SET_V4}", "tcp flags": "syn"}, None),
        ("refuse inbound ip6", {"meta l4proto": "tcp", "ip6 daddr": f"@{SET_V6}", "tcp flags": "syn"}, None),
    ],
)
def test_each_rule_matches_and_redirects_as_designed(
    name: str, matches: dict[str, Any], tproxy: dict[str, Any] | None
) -> None:
    r = rule(name)
    assert matched(r) == matches
    assert statements(r, "tproxy") == ([tproxy] if tproxy else [])


@pytest.mark.parametrize(
    ("name", "marks", "verdict"),
    [
        ("agent transparent socket", True, "accept"),
        ("agent upstream socket", False, "accept"),
        ("inbound hbone ip", True, "accept"),
        ("outbound ip6", True, "accept"),
        ("inbound plaintext ip", True, "accept"),
        ("refuse outbound ip", False, "reject"),
        ("refuse inbound ip6", False, "reject"),
    ],
)
def test_capturing_rules_mark_and_accept_refusing_rules_reset(name: str, marks: bool, verdict: str) -> None:
    r = rule(name)
    assert bool(statements(r, "mangle")) is marks
    assert list(r.expr[-1]) == [verdict]
    assert statements(r, "counter") == [None]
    if verdict == "reject":
        assert statements(r, "reject") == [{"type": "tcp reset"}]


def test_capture_mark_keeps_bits_outside_the_mask() -> None:
    settings = RedirectSettings(capture_mark=0x202, capture_mask=0xF0F, upstream_mark=0x539)
    (mangle,) = statements(rule("outbound ip", settings), "mangle")
    assert mangle == {
        "key": {"meta": {"key": "mark"}},
        "value": {"|": [{"&": [{"meta": {"key": "mark"}}, 0xFFFFF0F0]}, 0x202]},
    }


def test_ports_and_upstream_mark_come_from_the_settings() -> None:
    ports = PortSettings(outbound=16001, inbound_plaintext=16006, inbound_hbone=16008)
    settings = RedirectSettings(upstream_mark=0x1539)
    assert statements(rule("outbound ip", ports=ports), "tproxy") == [{"family": "ip", "port": 16001}]
    assert statements(rule("inbound plaintext ip6", ports=ports), "tproxy") == [
        {"family": "ip6", "port": 16006}
    ]
    assert matched(rule("inbound hbone ip", ports=ports))["tcp dport"] == 16008
    assert matched(rule("agent upstream socket", settings))["socket mark"] == 0x1539


def test_a_rule_comment_names_it_and_changes_with_its_expression() -> None:
    default = rule("outbound ip")
    moved = rule("outbound ip", ports=PortSettings(outbound=16001))
    assert default.comment.startswith("outbound ip ")
    assert default.comment != moved.comment
    assert rule("outbound ip").comment == default.comment


@pytest.mark.parametrize(
    ("ipv6", "families"),
    [(True, (4, 6)), (False, (4,))],
)
def test_routing_sends_marked_packets_to_a_local_table(ipv6: bool, families: tuple[int, ...]) -> None:
    settings = RedirectSettings(capture_mark=0x202, capture_mask=0xF0F, route_table=101, rule_priority=31000)
    desired = build(settings, PORTS, pods("10.1.0.5", "fd01::5"), ipv6=ipv6)
    assert desired.policy_rules == {PolicyRule(f, 31000, 0x202, 0xF0F, 101) for f in families}
    assert desired.local_routes == {LocalRoute(f, 101) for f in families}


def test_without_ipv6_the_ipv6_pods_are_left_out() -> None:
    assert build(SETTINGS, PORTS, pods("10.1.0.5", "fd01::5"), ipv6=False).pod_ips == pods("10.1.0.5")
    assert build(SETTINGS, PORTS, pods("10.1.0.5", "fd01::5")).pod_ips == pods("10.1.0.5", "fd01::5")


def test_sysctls_that_break_capture_are_required_off() -> None:
    sysctls = {s.name: s.value for s in build(SETTINGS, PORTS, frozenset()).sysctls}
    assert sysctls == {"net.ipv4.tcp_fwmark_accept": "0", "net.ipv4.conf.all.src_valid_mark": "0"}


def test_replace_transaction_names_only_the_agent_table() -> None:
    desired = build(SETTINGS, PORTS, pods("10.1.0.5", "fd01::5"))
    commands = replace_table_commands(desired)
    table = {"family": "inet", "name": "ambient_agent"}
    assert commands[:3] == [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
    ]
    for command in commands:
        ((verb, body),) = command.items()
        assert verb in ("add", "delete")
        ((kind, target),) = body.items()
        assert kind != "ruleset"
        assert target.get("table", target.get("name")) == "ambient_agent"


def test_replace_transaction_builds_the_chain_sets_rules_and_elements() -> None:
    desired = build(SETTINGS, PORTS, pods("10.1.0.5", "fd01::5"))
    added: dict[str, list[dict[str, Any]]] = {}
    for command in replace_table_commands(desired)[3:]:
        ((kind, body),) = command["add"].items()
        added.setdefault(kind, []).append(body)
    (chain,) = added["chain"]
    assert (chain["hook"], chain["prio"], chain["policy"]) == ("prerouting", CHAIN_PRIORITY, "accept")
    assert CHAIN_PRIORITY == -150 - 5
    assert [(s["name"], s["type"]) for s in added["set"]] == [(SET_V4, "ipv4_addr"), (SET_V6, "ipv6_addr")]
    assert [r["comment"] for r in added["rule"]] == [r.comment for r in desired.rules]
    assert [(e["name"], e["elem"]) for e in added["element"]] == [
        (SET_V4, ["10.1.0.5"]),
        (SET_V6, ["fd01::5"]),
    ]


def test_delete_transaction_cannot_fail_on_a_missing_table() -> None:
    table = {"family": "inet", "name": "ambient_agent"}
    assert delete_table_commands("ambient_agent") == [{"add": {"table": table}}, {"delete": {"table": table}}]


@pytest.mark.parametrize(
    ("add", "remove", "expected"),
    [
        ((), (), []),
        (("10.1.0.6",), (), [("add", SET_V4, ["10.1.0.6"])]),
        (("fd01::6", "10.1.0.7", "10.1.0.6"), (), [
            ("add", SET_V4, ["10.1.0.6", "10.1.0.7"]),
            ("add", SET_V6, ["fd01::6"]),
        ]),
        (("10.1.0.6",), ("10.1.0.5", "fd01::5"), [
            ("delete", SET_V4, ["10.1.0.5"]),
            ("delete", SET_V6, ["fd01::5"]),
            ("add", SET_V4, ["10.1.0.6"]),
        ]),
    ],
)  # fmt: skip
def test_element_updates_remove_then_add_per_family(
    add: tuple[str, ...], remove: tuple[str, ...], expected: list[tuple[str, str, list[str]]]
) -> None:
    commands = element_commands("ambient_agent", add=pods(*add), remove=pods(*remove))
    flat = []
    for command in commands:
        ((verb, body),) = command.items()
        element = body["element"]
        assert (element["family"], element["table"]) == ("inet", "ambient_agent")
        flat.append((verb, element["name"], element["elem"]))
    assert flat == expected


def test_an_nft_listing_of_the_desired_table_parses_to_the_desired_shape() -> None:
    desired = build(SETTINGS, PORTS, pods("10.1.0.5", "fd01::5"))
    installed = parse_table_listing(LISTING, "ambient_agent")
    assert installed.shape == desired.shape
    assert installed.pod_ips == pods("10.1.0.5", "fd01::5")


def _edited(edit: str) -> dict[str, Any]:
    listing = json.loads(json.dumps(LISTING))
    items = listing["nftables"]
    rules = [i for i, item in enumerate(items) if "rule" in item]
    if edit == "rule deleted":
        del items[rules[3]]
    elif edit == "rules swapped":
        items[rules[2]], items[rules[3]] = items[rules[3]], items[rules[2]]
    elif edit == "rule added":
        items.append({"rule": {**items[rules[0]]["rule"], "comment": "someone else's"}})
    elif edit == "chain added":
        items.append({"chain": {"family": "inet", "table": "ambient_agent", "name": "other", "handle": 9}})
    elif edit == "set emptied":
        next(i["set"] for i in items if "set" in i).pop("elem")
    elif edit == "set flags":
        next(i["set"] for i in items if "set" in i)["flags"] = ["interval"]
    elif edit == "chain priority":
        next(i["chain"] for i in items if "chain" in i)["prio"] = 0
    return listing


@pytest.mark.parametrize(
    ("edit", "same_shape", "pod_ips"),
    [
        ("rule deleted", False, ("10.1.0.5", "fd01::5")),
        ("rules swapped", False, ("10.1.0.5", "fd01::5")),
        ("rule added", False, ("10.1.0.5", "fd01::5")),
        ("chain added", False, ("10.1.0.5", "fd01::5")),
        ("set flags", False, ("10.1.0.5", "fd01::5")),
        ("chain priority", False, ("10.1.0.5", "fd01::5")),
        ("set emptied", True, ("fd01::5",)),
    ],
)
def test_listing_changes_behind_the_agents_back_are_seen(
    edit: str, same_shape: bool, pod_ips: tuple[str, ...]
) -> None:
    desired = build(SETTINGS, PORTS, frozenset())
    installed = parse_table_listing(_edited(edit), "ambient_agent")
    assert (installed.shape == desired.shape) is same_shape
    assert installed.pod_ips == pods(*pod_ips)


def test_a_set_with_non_address_elements_is_not_the_agents() -> None:
    listing = json.loads(json.dumps(LISTING))
    next(i["set"] for i in listing["nftables"] if "set" in i)["elem"] = [
        {"prefix": {"addr": "10.1.0.0", "len": 24}}
    ]
    assert parse_table_listing(listing, "ambient_agent").shape is None
