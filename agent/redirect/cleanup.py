"""Removal of everything the agent installs for capture: its table, its ip rules, its local routes.

Touches nothing else: the table by name, rules only when they look up the agent's routing table by
its capture mark alone, routes only of the `local default dev lo` shape in that table. Running it
twice, or on a node that never ran the agent, removes nothing and succeeds. Sysctls are left as they
are: the agent only ever changes ones whose other value breaks capture, and does not record what
they were before.
"""

from __future__ import annotations

from agent.redirect.reconciler import NftablesPort, RoutingPort, SysctlPort
from agent.redirect.ruleset import delete_table_commands
from agent.settings import RedirectSettings


def remove_redirection(
    settings: RedirectSettings, nftables: NftablesPort, routing: RoutingPort, sysctls: SysctlPort
) -> list[str]:
    """Removes the agent's capture state; returns one line per thing removed (empty: none was there)."""
    removed: list[str] = []
    # The table first: from then on no packet is marked, so the rules and routes carry no traffic.
    if nftables.list_table(settings.table_name) is not None:
        nftables.apply(delete_table_commands(settings.table_name))
        removed.append(f"table inet {settings.table_name}")
    families = (4, 6) if sysctls.ipv6_available() else (4,)
    for family in families:
        rules = routing.rules(family, settings.route_table, settings.capture_mark, settings.capture_mask)
        for rule in sorted(rules):
            routing.delete_rule(rule)
            removed.append(str(rule))
    for family in families:
        for route in sorted(routing.local_routes(family, settings.route_table)):
            routing.delete_route(route)
            removed.append(str(route))
    return removed
