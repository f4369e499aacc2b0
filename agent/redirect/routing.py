"""The policy-routing adapter: the agent's ip rules and local routes, over netlink with pyroute2.

It reads only rules that look up the agent's routing table by firewall mark alone, and routes of
the `local default dev lo` shape in that table; adding what exists or deleting what is gone is not
an error, so a retried reconcile never fails on its own earlier half-done work.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from pyroute2 import IPRoute, NetlinkError

from agent.redirect.errors import RoutingError
from agent.redirect.ruleset import LocalRoute, PolicyRule

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_DEFAULT_DST = {4: "0.0.0.0/0", 6: "::/0"}
_FR_ACT_TO_TBL = 1
_RTN_LOCAL = 2
_LOOPBACK = "lo"
# Attributes that make a rule select on more than the mark: such a rule is never the agent's.
_SELECTORS = frozenset(
    {
        "FRA_SRC",
        "FRA_DST",
        "FRA_IIFNAME",
        "FRA_OIFNAME",
        "FRA_UID_RANGE",
        "FRA_IP_PROTO",
        "FRA_SPORT_RANGE",
        "FRA_DPORT_RANGE",
        "FRA_L3MDEV",
        "FRA_TUN_ID",
    }
)


class PolicyRouting:
    """ip rules and routes of the current network namespace; one netlink socket per call."""

    def rules(self, family: int, table: int, fwmark: int, fwmask: int) -> frozenset[PolicyRule]:
        """The `family` rules, at any priority, that send packets marked `fwmark/fwmask` to `table`
        and select on nothing else."""
        found: set[PolicyRule] = set()
        for message in self._call(f"list IPv{family} rules", "get_rules", family=_AF[family]):
            if (
                _is_mark_only_rule(message)
                and _rule_table(message) == table
                and message.get("FRA_FWMARK") == fwmark
                and (message.get("FRA_FWMASK") or 0xFFFFFFFF) == fwmask
            ):
                found.add(PolicyRule(family, message.get("FRA_PRIORITY") or 0, fwmark, fwmask, table))
        return frozenset(found)

    def add_rule(self, rule: PolicyRule) -> None:
        """Adds `rule`; an identical rule already present is fine."""
        self._change(f"add {rule}", "rule", "add", ignore=errno.EEXIST, **_rule_args(rule))

    def delete_rule(self, rule: PolicyRule) -> None:
        """Deletes `rule`; a rule already gone is fine."""
        self._change(f"delete {rule}", "rule", "del", ignore=errno.ENOENT, **_rule_args(rule))

    def local_routes(self, family: int, table: int) -> frozenset[LocalRoute]:
        """The `local default dev lo` routes of `family` in `table`."""
        loopback = self._loopback_index()
        found: set[LocalRoute] = set()
        for message in self._call(f"list IPv{family} routes", "get_routes", family=_AF[family], table=table):
            if (
                message.get("RTA_TABLE", message["table"]) == table
                and message["type"] == _RTN_LOCAL
                and message["dst_len"] == 0
                and message.get("RTA_DST") is None
                and message.get("RTA_OIF") == loopback
            ):
                found.add(LocalRoute(family=family, table=table))
        return frozenset(found)

    def add_route(self, route: LocalRoute) -> None:
        """Adds `route`; the route already present is fine."""
        self._change(f"add {route}", "route", "add", ignore=errno.EEXIST, **self._route_args(route))

    def delete_route(self, route: LocalRoute) -> None:
        """Deletes `route`; a route already gone is fine."""
        self._change(f"delete {route}", "route", "del", ignore=errno.ESRCH, **self._route_args(route))

    def _route_args(self, route: LocalRoute) -> dict[str, Any]:
        args: dict[str, Any] = {
            "family": _AF[route.family],
            "dst": _DEFAULT_DST[route.family],
            "type": "local",
            "table": route.table,
            "oif": self._loopback_index(),
        }
        if route.family == 4:
            # An IPv4 local route has host scope; a delete must name it too, or nothing matches.
            args["scope"] = "host"
        return args

    def _loopback_index(self) -> int:
        indexes = self._call("look up lo", "link_lookup", ifname=_LOOPBACK)
        if not indexes:
            raise RoutingError("no loopback device in this network namespace")
        index: int = indexes[0]
        return index

    def _change(self, what: str, method: str, command: str, *, ignore: int, **args: Any) -> None:
        try:
            with IPRoute() as ipr:
                getattr(ipr, method)(command, **args)
        except NetlinkError as error:
            if error.code != ignore:
                raise RoutingError(f"{what}: {error}") from error
        except OSError as error:
            raise RoutingError(f"{what}: {error}") from error

    def _call(self, what: str, method: str, **args: Any) -> list[Any]:
        try:
            with IPRoute() as ipr:
                return list(getattr(ipr, method)(**args))
        except (NetlinkError, OSError) as error:
            raise RoutingError(f"{what}: {error}") from error


def _rule_args(rule: PolicyRule) -> dict[str, Any]:
    return {
        "family": _AF[rule.family],
        "priority": rule.priority,
        "fwmark": rule.fwmark,
        "fwmask": rule.fwmask,
        "table": rule.table,
    }


def _rule_table(message: Any) -> int:
    table: int = message.get("FRA_TABLE") or message["table"]
    return table


def _is_mark_only_rule(message: Any) -> bool:
    return (
        message["action"] == _FR_ACT_TO_TBL
        and message.get("FRA_FWMARK") is not None
        and message["src_len"] == 0
        and message["dst_len"] == 0
        and message["tos"] == 0
        and message["flags"] == 0
        and not any(name in _SELECTORS for name, _ in message["attrs"])
    )
