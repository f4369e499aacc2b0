"""`python -m tests.e2e.cluster up|down|status --state-dir DIR`: the local cluster from a shell.

`up` starts a cluster that keeps running after the command returns and prints how to use it; `down`
removes everything of the prefix (also when the state directory is gone); `status` shows what runs.
The prefix comes from `--prefix`, else (down, status) the state directory's record, else
`AMBIENT_E2E_PREFIX`, else "aae".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from tests.e2e.cluster import fabric, netns
from tests.e2e.cluster.cluster import Cluster, ClusterError
from tests.e2e.cluster.layout import Layout, prefix_from_env


def _layout(args: argparse.Namespace) -> Layout:
    """The cluster named by the flags; `down`/`status` default to the prefix recorded in the state dir."""
    state_dir = args.state_dir.resolve()
    prefix = args.prefix
    state_file = state_dir / "cluster.json"
    if prefix is None and args.command != "up" and state_file.exists():
        prefix = json.loads(state_file.read_text())["prefix"]
    return Layout(prefix=prefix or prefix_from_env(), state_dir=state_dir, node_count=args.nodes)


def up(args: argparse.Namespace) -> int:
    layout = _layout(args)
    started = time.monotonic()
    try:
        cluster = Cluster.up(layout)
    except (ClusterError, netns.CommandError, fabric.FabricError) as error:
        print(f"cluster-up failed (everything it started was removed): {error}", file=sys.stderr)
        return 1
    print(f"cluster {layout.prefix!r} up in {time.monotonic() - started:.1f}s (warm bring-up)")
    print(cluster.describe())
    print(
        f"tear down: python -m tests.e2e.cluster down --state-dir {layout.state_dir}  (or: make cluster-down)"
    )
    return 0


def down(args: argparse.Namespace) -> int:
    layout = _layout(args)
    started = time.monotonic()
    fabric.teardown(layout)
    shutil.rmtree(layout.state_dir, ignore_errors=True)
    left = fabric.leftovers(layout)
    if left:
        print(f"cluster {layout.prefix!r}: could not remove {left}", file=sys.stderr)
        return 1
    print(f"cluster {layout.prefix!r} removed in {time.monotonic() - started:.1f}s")
    return 0


def status(args: argparse.Namespace) -> int:
    layout = _layout(args)
    namespaces = netns.list_with_prefix(layout.netns_prefix)
    if not namespaces:
        print(f"cluster {layout.prefix!r}: not running")
        return 1
    for name in namespaces:
        commands = []
        for pid in netns.pids_in(name):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            commands.append(f"    {pid} {cmdline[:150]}")
        print(f"{name}: {len(commands)} processes", *commands, sep="\n")
    if layout.state_file.exists():
        cluster = Cluster.attach(layout.state_dir)
        code, nodes = cluster.api("GET", "/api/v1/nodes")
        if code != 200:
            print(f"API server not answering (status {code})")
        for node in nodes["items"] if code == 200 else []:
            ready = [c["status"] for c in node["status"].get("conditions", []) if c["type"] == "Ready"]
            print(f"node {node['metadata']['name']}: Ready={ready[0] if ready else 'unknown'}")
        print(cluster.describe())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.cluster", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", type=Path, required=True, help="certificates, kubeconfig, logs")
    parser.add_argument(
        "--prefix",
        help="prefix of every name created (default: the state dir's cluster, AMBIENT_E2E_PREFIX, 'aae')",
    )
    parser.add_argument("--nodes", type=int, default=2, help="number of nodes (up)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the local cluster needs root (network namespaces)", file=sys.stderr)
        return 1
    return {"up": up, "down": down, "status": status}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
