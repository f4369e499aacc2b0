"""The `ambient-agent redirect` and `ambient-agent cleanup` commands, on the current network namespace.

`redirect apply` reconciles the node's capture once for a given set of enrolled pod IPs and prints
what it changed; `redirect run` keeps doing it (drift repair, retries) until SIGTERM or SIGINT, and
leaves the capture in place when it stops. They capture without the rest of the agent: for
debugging a node, and for the end-to-end tests, which run them inside each node's namespace.
`cleanup` removes everything capture installed. Settings come from `AMBIENT_*` environment variables
(`agent.settings.redirect_settings_from_env`); the ports are the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from ipaddress import ip_address

from agent.redirect.cleanup import remove_redirection
from agent.redirect.errors import RedirectError
from agent.redirect.nft import Nftables
from agent.redirect.reconciler import ReconcileLoop, RedirectReconciler
from agent.redirect.routing import PolicyRouting
from agent.redirect.ruleset import PodIp
from agent.redirect.sysctl import Sysctls
from agent.settings import PortSettings, RedirectSettings, redirect_settings_from_env

FAILED_EXIT = 1
"""Exit status when the kernel refused a read or a change (the message is on stderr)."""


def node_reconciler(settings: RedirectSettings, ports: PortSettings) -> RedirectReconciler:
    """A reconciler acting on this network namespace's nftables, routing and sysctls."""
    return RedirectReconciler(settings, ports, Nftables(), PolicyRouting(), Sysctls())


def add_redirect_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `redirect apply` and `redirect run` to the `ambient-agent` subcommands (`commands`)."""
    redirect = commands.add_parser(
        "redirect",
        help="capture this node's traffic for the given pod IPs, without the rest of the agent",
        description=(
            "Install and keep this network namespace's capture (nftables table, ip rules, local routes)"
            " for exactly the given enrolled pod IPs, without the rest of the agent: for debugging a"
            " node and for the end-to-end tests. Settings come from AMBIENT_* environment variables."
            " Remove everything with `ambient-agent cleanup`. See docs/redirect.md."
        ),
    )
    actions = redirect.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, runner, help_text in (
        ("apply", _apply, "reconcile once and print what changed"),
        ("run", _run, "reconcile now and on drift until SIGTERM/SIGINT; capture stays installed"),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument(
            "--pod-ip",
            dest="pod_ips",
            action="append",
            type=ip_address,
            default=[],
            metavar="IP",
            help="an enrolled local pod's address (IPv4 or IPv6); repeat for each pod",
        )
        action.set_defaults(run=runner)


def run_cleanup(_: argparse.Namespace) -> int:
    """`ambient-agent cleanup`: removes the agent's table, ip rules and local routes from this node."""
    settings = redirect_settings_from_env()
    try:
        removed = remove_redirection(settings, Nftables(), PolicyRouting(), Sysctls())
    except RedirectError as error:
        print(f"ambient-agent cleanup: {error}", file=sys.stderr)
        return FAILED_EXIT
    for line in removed:
        print(f"removed {line}")
    if not removed:
        print("nothing to remove")
    return 0


def _apply(args: argparse.Namespace) -> int:
    settings = redirect_settings_from_env()
    pods: frozenset[PodIp] = frozenset(args.pod_ips)
    try:
        change = node_reconciler(settings, PortSettings()).reconcile(pods)
    except RedirectError as error:
        print(f"ambient-agent redirect apply: {error}", file=sys.stderr)
        return FAILED_EXIT
    for line in change.describe(settings.table_name):
        print(line)
    if change.empty:
        print("no changes")
    return 0


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = redirect_settings_from_env()
    loop = ReconcileLoop(node_reconciler(settings, PortSettings()), settings)
    loop.enrol(frozenset(args.pod_ips))
    asyncio.run(_until_signalled(loop))
    return 0


async def _until_signalled(reconcile_loop: ReconcileLoop) -> None:
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    reconciling = asyncio.create_task(reconcile_loop.run(), name="redirect-reconcile")
    stopping = asyncio.create_task(stop.wait(), name="redirect-stop")
    await asyncio.wait({reconciling, stopping}, return_when=asyncio.FIRST_COMPLETED)
    for task in (reconciling, stopping):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
