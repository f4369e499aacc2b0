"""The difference between the desired and the installed capture state, as a `Plan` of changes.

Pure: the reconciler reads the installed state through the adapters, calls `plan()`, and applies
what it returns. An empty plan means the node already matches, which is what makes a second
reconcile change nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.redirect.ruleset import DesiredRedirect, InstalledTable, LocalRoute, PodIp, PolicyRule, SysctlValue


@dataclass(frozen=True)
class InstalledRedirect:
    """The node's capture state as read from the kernel."""

    table: InstalledTable | None
    """The agent's nftables table, or None when it does not exist."""

    policy_rules: frozenset[PolicyRule]
    """The agent's ip rules: those looking up its routing table by its capture mark and mask alone,
    at any priority."""

    local_routes: frozenset[LocalRoute]
    """`local default dev lo` routes in the agent's routing table."""

    sysctls: Mapping[str, str | None]
    """Current values of the settings the desired state names; None where the kernel lacks one."""


@dataclass(frozen=True)
class Plan:
    """Changes that bring the node to the desired state, in the order they are applied."""

    write_sysctls: tuple[SysctlValue, ...] = ()
    """Settings to write."""

    add_routes: frozenset[LocalRoute] = frozenset()
    """Routes to add (before the rules that lead to them)."""

    add_rules: frozenset[PolicyRule] = frozenset()
    """ip rules to add."""

    remove_rules: frozenset[PolicyRule] = frozenset()
    """The agent's ip rules that are no longer desired (e.g. its priority setting changed)."""

    replace_table: bool = False
    """Rewrite the whole table, elements included, in one transaction."""

    add_pods: frozenset[PodIp] = frozenset()
    """Set elements to add to the installed table."""

    remove_pods: frozenset[PodIp] = frozenset()
    """Set elements to remove from the installed table."""

    @property
    def empty(self) -> bool:
        """True when the node already matches."""
        return not (
            self.write_sysctls
            or self.add_routes
            or self.add_rules
            or self.remove_rules
            or self.replace_table
            or self.add_pods
            or self.remove_pods
        )

    def describe(self, table: str) -> list[str]:
        """One line per change, for logs and the command line."""
        lines = [f"set sysctl {s.name}={s.value}" for s in self.write_sysctls]
        lines += [f"add {route}" for route in sorted(self.add_routes)]
        lines += [f"add {rule}" for rule in sorted(self.add_rules)]
        lines += [f"remove {rule}" for rule in sorted(self.remove_rules)]
        if self.replace_table:
            lines.append(f"replace table inet {table}")
        lines += [f"remove pod {ip}" for ip in _sorted(self.remove_pods)]
        lines += [f"add pod {ip}" for ip in _sorted(self.add_pods)]
        return lines


def plan(desired: DesiredRedirect, installed: InstalledRedirect) -> Plan:
    """What to change so that `installed` becomes `desired`."""
    table = installed.table
    replace = table is None or table.shape != desired.shape
    return Plan(
        write_sysctls=tuple(
            s for s in desired.sysctls if installed.sysctls.get(s.name) not in (None, s.value)
        ),
        add_routes=desired.local_routes - installed.local_routes,
        add_rules=desired.policy_rules - installed.policy_rules,
        remove_rules=installed.policy_rules - desired.policy_rules,
        replace_table=replace,
        add_pods=frozenset() if replace or table is None else desired.pod_ips - table.pod_ips,
        remove_pods=frozenset() if replace or table is None else table.pod_ips - desired.pod_ips,
    )


def plan_pods(desired: frozenset[PodIp], installed: frozenset[PodIp]) -> Plan:
    """The set updates alone, when only the enrolled pods changed since the installed state was known."""
    return Plan(add_pods=desired - installed, remove_pods=installed - desired)


def _sorted(ips: frozenset[PodIp]) -> list[PodIp]:
    return sorted(ips, key=lambda ip: (ip.version, ip))
