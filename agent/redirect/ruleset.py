"""The node's desired capture state as pure data, and the nftables JSON that installs or reads it.

`build()` turns the settings and the enrolled local pod IPs into a `DesiredRedirect`: one `inet`
nftables table owned by the agent (two address sets and a prerouting chain), the policy-routing rules
and local routes that deliver marked packets to the agent's sockets, and the sysctl values capture
depends on. The rule order is ARCHITECTURE.md section 2, verified on this kernel; see
docs/redirect.md for each rule's reason. No I/O happens here.

Each nftables rule carries a comment `<name> <digest of its expression>`, so the installed chain is
compared with the desired one by comments alone: nft lists rules in a normalised form that differs
from what was sent, and comparing expressions would make the comparison depend on nft's printer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from agent.settings import PortSettings, RedirectSettings

PodIp = IPv4Address | IPv6Address
"""An enrolled pod's address."""

NftCommand = dict[str, Any]
"""One command of an `nft -j` document (`{"add": {...}}`, `{"delete": {...}}`, ...)."""

FAMILY = "inet"
"""The table's nftables family: one table sees IPv4 and IPv6."""

CHAIN = "prerouting"
"""The only chain of the agent's table."""

CHAIN_PRIORITY = -155
"""`mangle - 5`: before kube-proxy's DNAT (-100), so captured traffic still shows the ClusterIP."""

SET_V4 = "pod_ips_v4"
"""Set of enrolled local IPv4 pod addresses."""

SET_V6 = "pod_ips_v6"
"""Set of enrolled local IPv6 pod addresses."""

_SET_TYPES = {SET_V4: "ipv4_addr", SET_V6: "ipv6_addr"}

_MARK_BITS = 0xFFFFFFFF


@dataclass(frozen=True, order=True)
class PolicyRule:
    """`ip [-6] rule add fwmark MARK/MASK lookup TABLE priority PRIORITY`."""

    family: int
    """4 or 6."""

    priority: int
    """The rule's preference."""

    fwmark: int
    """Mark a packet must carry (under `fwmask`) to be looked up in `table`."""

    fwmask: int
    """Mask applied to the packet mark before comparing with `fwmark`."""

    table: int
    """Routing table the rule sends marked packets to."""

    def __str__(self) -> str:
        selector = f"fwmark {self.fwmark:#x}/{self.fwmask:#x} lookup {self.table}"
        return f"IPv{self.family} rule {self.priority}: {selector}"


@dataclass(frozen=True, order=True)
class LocalRoute:
    """`ip [-6] route add local default dev lo table TABLE`: every address routed here is local."""

    family: int
    """4 or 6."""

    table: int
    """Routing table that holds the route."""

    def __str__(self) -> str:
        return f"IPv{self.family} route local default dev lo table {self.table}"


@dataclass(frozen=True)
class SysctlValue:
    """A kernel setting capture depends on, and the value it needs."""

    name: str
    """Dotted sysctl name, e.g. `net.ipv4.tcp_fwmark_accept`."""

    value: str
    """The value as `/proc/sys` prints it."""

    reason: str
    """What breaks when the setting has another value."""


@dataclass(frozen=True)
class NftRule:
    """One rule of the agent's chain."""

    name: str
    """What the rule does, in a word or three; the first part of its comment."""

    expr: tuple[dict[str, Any], ...]
    """The rule's statements in nft JSON."""

    @property
    def comment(self) -> str:
        """`<name> <digest>`: identifies the rule in a listing, and changes when `expr` does."""
        canonical = json.dumps(self.expr, sort_keys=True, separators=(",", ":"))
        return f"{self.name} {hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class TableShape:
    """Everything about the agent's table except the set elements: what a full replace rewrites."""

    chain_hook: tuple[str, str, int, str]
    """The chain's (type, hook, priority, policy)."""

    sets: tuple[tuple[str, str], ...]
    """(name, element type) of each set, sorted by name."""

    rule_comments: tuple[str, ...]
    """The chain's rules, in order, by comment."""


@dataclass(frozen=True)
class InstalledTable:
    """The agent's table as read from the kernel."""

    shape: TableShape | None
    """The table's structure; None when it holds something this builder never makes."""

    pod_ips: frozenset[PodIp]
    """Elements of both address sets."""


@dataclass(frozen=True)
class DesiredRedirect:
    """What the node must hold for the given enrolled pods."""

    table: str
    """Name of the agent's `inet` table."""

    rules: tuple[NftRule, ...]
    """The prerouting chain's rules, in order."""

    pod_ips: frozenset[PodIp]
    """Elements of the address sets (IPv4 ones go to `pod_ips_v4`, IPv6 ones to `pod_ips_v6`)."""

    policy_rules: frozenset[PolicyRule]
    """The ip rules sending marked packets to the agent's routing table."""

    local_routes: frozenset[LocalRoute]
    """The routes making every address in the agent's routing table local."""

    sysctls: tuple[SysctlValue, ...]
    """Kernel settings capture depends on."""

    @property
    def shape(self) -> TableShape:
        """The table's structure, comparable with `InstalledTable.shape`."""
        return TableShape(
            chain_hook=("filter", "prerouting", CHAIN_PRIORITY, "accept"),
            sets=tuple(sorted(_SET_TYPES.items())),
            rule_comments=tuple(rule.comment for rule in self.rules),
        )


def build(
    settings: RedirectSettings, ports: PortSettings, pod_ips: frozenset[PodIp], *, ipv6: bool = True
) -> DesiredRedirect:
    """The desired capture state for `pod_ips`; `ipv6=False` leaves out IPv6 routing (IPv6 is off)."""
    families = (4, 6) if ipv6 else (4,)
    return DesiredRedirect(
        table=settings.table_name,
        rules=_chain_rules(settings, ports),
        pod_ips=pod_ips if ipv6 else frozenset(ip for ip in pod_ips if ip.version == 4),
        policy_rules=frozenset(
            PolicyRule(
                f, settings.rule_priority, settings.capture_mark, settings.capture_mask, settings.route_table
            )
            for f in families
        ),
        local_routes=frozenset(LocalRoute(f, settings.route_table) for f in families),
        sysctls=(
            SysctlValue(
                "net.ipv4.tcp_fwmark_accept",
                "0",
                "accepted sockets would take the capture mark and route their replies to lo",
            ),
            SysctlValue(
                "net.ipv4.conf.all.src_valid_mark",
                "0",
                "the source check would route marked packets' sources to lo and drop them as martians",
            ),
        ),
    )


def _match(left: object, right: object) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}


def _payload(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


_TCP = _match({"meta": {"key": "l4proto"}}, "tcp")
_INITIAL_SYN = _match({"&": [_payload("tcp", "flags"), ["fin", "syn", "rst", "ack"]]}, "syn")
_COUNTER: dict[str, Any] = {"counter": None}
_ACCEPT: dict[str, Any] = {"accept": None}
_REFUSE: dict[str, Any] = {"reject": {"type": "tcp reset"}}


def _chain_rules(settings: RedirectSettings, ports: PortSettings) -> tuple[NftRule, ...]:
    # Keeps the mark bits outside the mask, which other software (kube-proxy, CNIs) may own.
    set_capture_mark = {
        "mangle": {
            "key": {"meta": {"key": "mark"}},
            "value": {
                "|": [
                    {"&": [{"meta": {"key": "mark"}}, ~settings.capture_mask & _MARK_BITS]},
                    settings.capture_mark,
                ]
            },
        }
    }

    def capture(port: int) -> Callable[[str], tuple[dict[str, Any], ...]]:
        return lambda ip: ({"tproxy": {"family": ip, "port": port}}, set_capture_mark, _COUNTER, _ACCEPT)

    def refuse(_: str) -> tuple[dict[str, Any], ...]:
        return (_COUNTER, _REFUSE)

    def for_pods(
        name: str,
        direction: str,
        *matches: dict[str, Any],
        then: Callable[[str], tuple[dict[str, Any], ...]],
    ) -> list[NftRule]:
        return [
            NftRule(
                f"{name} {ip}", (_TCP, _match(_payload(ip, direction), f"@{pod_set}"), *matches, *then(ip))
            )
            for ip, pod_set in (("ip", SET_V4), ("ip6", SET_V6))
        ]

    return (
        # Packets of the agent's own transparent sockets: the rest of captured flows, and replies to
        # upstream connections spoofing a client's address. `wildcard 0` leaves out the listeners
        # bound to 0.0.0.0, which would otherwise take any forwarded SYN to ports 15001/15006/15008.
        NftRule(
            "agent transparent socket",
            (
                _TCP,
                _match({"socket": {"key": "transparent"}}, 1),
                _match({"socket": {"key": "wildcard"}}, 0),
                set_capture_mark,
                _COUNTER,
                _ACCEPT,
            ),
        ),
        NftRule(
            "agent upstream socket",
            (_TCP, _match({"socket": {"key": "mark"}}, settings.upstream_mark), _COUNTER, _ACCEPT),
        ),
        *for_pods(
            "inbound hbone",
            "daddr",
            _match(_payload("tcp", "dport"), ports.inbound_hbone),
            then=capture(ports.inbound_hbone),
        ),
        *for_pods("outbound", "saddr", then=capture(ports.outbound)),
        *for_pods("inbound plaintext", "daddr", then=capture(ports.inbound_plaintext)),
        # Reached only when a tproxy above found no listener (the agent is down): refuse new
        # connections rather than let them bypass the mesh.
        *for_pods("refuse outbound", "saddr", _INITIAL_SYN, then=refuse),
        *for_pods("refuse inbound", "daddr", _INITIAL_SYN, then=refuse),
    )


def _table_ref(table: str) -> dict[str, Any]:
    return {"family": FAMILY, "name": table}


def replace_table_commands(desired: DesiredRedirect) -> list[NftCommand]:
    """One transaction that replaces the agent's table (creating it if absent) and nothing else."""
    table = desired.table
    commands: list[NftCommand] = [
        # `add` first so that `delete` cannot fail on a missing table.
        {"add": {"table": _table_ref(table)}},
        {"delete": {"table": _table_ref(table)}},
        {"add": {"table": _table_ref(table)}},
    ]
    commands += [
        {"add": {"set": {"family": FAMILY, "table": table, "name": name, "type": kind}}}
        for name, kind in sorted(_SET_TYPES.items())
    ]
    commands.append(
        {
            "add": {
                "chain": {
                    "family": FAMILY,
                    "table": table,
                    "name": CHAIN,
                    "type": "filter",
                    "hook": "prerouting",
                    "prio": CHAIN_PRIORITY,
                    "policy": "accept",
                }
            }
        }
    )
    commands += [
        {
            "add": {
                "rule": {
                    "family": FAMILY,
                    "table": table,
                    "chain": CHAIN,
                    "comment": r.comment,
                    "expr": list(r.expr),
                }
            }
        }
        for r in desired.rules
    ]
    commands += element_commands(table, add=desired.pod_ips, remove=frozenset())
    return commands


def delete_table_commands(table: str) -> list[NftCommand]:
    """One transaction that removes the agent's table if it exists, and nothing else."""
    return [{"add": {"table": _table_ref(table)}}, {"delete": {"table": _table_ref(table)}}]


def element_commands(table: str, *, add: frozenset[PodIp], remove: frozenset[PodIp]) -> list[NftCommand]:
    """Incremental set updates: removals first, then additions, per address family."""
    commands: list[NftCommand] = []
    for verb, addresses in (("delete", remove), ("add", add)):
        for version, name in ((4, SET_V4), (6, SET_V6)):
            elements = sorted(str(ip) for ip in addresses if ip.version == version)
            if elements:
                commands.append(
                    {verb: {"element": {"family": FAMILY, "table": table, "name": name, "elem": elements}}}
                )
    return commands


def parse_table_listing(listing: Mapping[str, Any], table: str) -> InstalledTable:
    """Reads the output of `nft -j list table inet <table>` into what the reconciler compares."""
    chains: list[tuple[str, str, int, str]] = []
    sets: list[tuple[str, str]] = []
    comments: list[str] = []
    pod_ips: set[PodIp] = set()
    unknown = False
    for item in listing.get("nftables", ()):
        kind, body = next(iter(item.items()))
        if kind in ("metainfo", "table"):
            continue
        if body.get("table") != table or body.get("family") != FAMILY:
            continue
        if kind == "chain":
            chains.append((body.get("type"), body.get("hook"), body.get("prio"), body.get("policy")))
            unknown |= body.get("name") != CHAIN
        elif kind == "set":
            sets.append((body["name"], body.get("type")))
            elements, parsed = _parse_elements(body.get("elem", ()))
            pod_ips |= elements
            unknown |= not parsed or body.get("flags") is not None
        elif kind == "rule":
            comments.append(body.get("comment", ""))
        else:
            unknown = True
    shape = None
    if len(chains) == 1 and not unknown:
        shape = TableShape(chain_hook=chains[0], sets=tuple(sorted(sets)), rule_comments=tuple(comments))
    return InstalledTable(shape=shape, pod_ips=frozenset(pod_ips))


def _parse_elements(elements: Sequence[Any]) -> tuple[set[PodIp], bool]:
    """Plain address elements; False when the set holds anything else (ranges, element options)."""
    parsed: set[PodIp] = set()
    for element in elements:
        if not isinstance(element, str):
            return parsed, False
        try:
            parsed.add(ip_address(element))
        except ValueError:
            return parsed, False
    return parsed, True
