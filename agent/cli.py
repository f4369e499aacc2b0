"""The `ambient-agent` command line: one subcommand per process the product runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from agent import __version__

NOT_BUILT_EXIT = 2
"""Exit status of a subcommand that exists in the design but is not implemented yet."""


def _not_built(name: str, issue: str) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        print(
            f"ambient-agent {name}: not built yet ({issue}); nothing was started.",
            file=sys.stderr,
        )
        return NOT_BUILT_EXIT

    return run


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
    node.set_defaults(run=_not_built("node", "the HBONE data plane and control plane are open issues"))

    ca = commands.add_parser("ca", help="run the workload certificate authority (CSR signer)")
    ca.set_defaults(run=_not_built("ca", "the workload identity CA is an open issue"))

    cleanup = commands.add_parser(
        "cleanup", help="remove every nftables table, ip rule and route the agent created on this node"
    )
    cleanup.set_defaults(run=_not_built("cleanup", "node redirection is an open issue"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ambient-agent` console script."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
