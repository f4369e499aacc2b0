"""The `ambient-agent` command line: one subcommand per process the product runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from agent import __version__
from agent.node.command import run_node
from agent.node.settings import add_node_arguments
from agent.redirect.command import add_redirect_command, run_cleanup
from agent.settings import SettingsError

SETTINGS_EXIT = 2
"""Exit status when a flag or environment variable has an invalid value (as argparse's own errors)."""


def _run_ca(args: argparse.Namespace) -> int:
    from agent.operator.ca import run_ca
    from agent.operator.ca_settings import ca_settings_from

    try:
        settings = ca_settings_from(
            namespace=args.namespace,
            trust_domain=args.trust_domain,
            leaf_lifetime=args.leaf_lifetime,
            max_lifetime=args.max_lifetime,
            agent_service_account=args.agent_service_account,
            kubeconfig=args.kubeconfig,
        )
    except SettingsError as error:
        print(f"ambient-agent ca: {error}", file=sys.stderr)
        return SETTINGS_EXIT
    return run_ca(settings)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand, each bound to the function that runs it."""
    parser = argparse.ArgumentParser(
        prog="ambient-agent",
        description="Sidecar-less mutual TLS for Kubernetes pods: a node agent speaking HBONE.",
    )
    parser.add_argument("--version", action="version", version=f"ambient-agent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    node = commands.add_parser(
        "node", help="run the node agent (capture, HBONE data plane, enrolment, identities)"
    )
    add_node_arguments(node)
    node.set_defaults(run=run_node)

    ca = commands.add_parser("ca", help="run the workload certificate authority (CSR signer)")
    ca.add_argument(
        "--namespace", help="namespace of the CA's Secret and bundle ConfigMap (env POD_NAMESPACE)"
    )
    ca.add_argument("--trust-domain", help="SPIFFE trust domain (env AMBIENT_TRUST_DOMAIN; cluster.local)")
    ca.add_argument(
        "--leaf-lifetime", help="lifetime of issued certificates, e.g. 24h (env AMBIENT_LEAF_LIFETIME; 24h)"
    )
    ca.add_argument(
        "--max-lifetime",
        help="cap on a request's spec.expirationSeconds (env AMBIENT_MAX_LIFETIME; the leaf lifetime)",
    )
    ca.add_argument(
        "--agent-service-account",
        metavar="NAMESPACE/NAME",
        help="the node agents' service account (env AMBIENT_AGENT_SERVICE_ACCOUNT; NAMESPACE/ambient-agent)",
    )
    ca.add_argument("--kubeconfig", help="kubeconfig (default: $KUBECONFIG, else the pod's service account)")
    ca.set_defaults(run=_run_ca)

    cleanup = commands.add_parser(
        "cleanup", help="remove every nftables table, ip rule and route the agent created on this node"
    )
    cleanup.set_defaults(run=run_cleanup)

    add_redirect_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ambient-agent` console script."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
