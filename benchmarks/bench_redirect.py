"""Redirect reconcile benchmark: what enrolling one more pod costs on a node with 500 enrolled pods.

`make bench` runs `python -m benchmarks.bench_redirect` (root). It creates a throwaway network
namespace (`ambench-redirect`, removed afterwards, and removed first if a killed run left it), runs
itself inside it with `--inside`, and there drives the real reconciler (`nft`, pyroute2, /proc/sys)
through these operations, each timed on its own:

- add one pod / remove one pod, incrementally (the node agent's path on a pod change: one
  `nft -j -f -` adding or deleting one set element, no read);
- add one pod through a full pass (read the table, rules, routes and sysctls, diff, add the element:
  what `ambient-agent redirect apply` and a drift check that finds a new pod do);
- a drift check that finds nothing to do (the full pass every `drift_check_interval`);
- a full install of the table with 500 pods plus the routing (what every pod change would cost
  if each rewrote the table).

It prints a table: wall time p50/p90 per operation and CPU per operation (this process plus the
`nft` processes it ran). Not a timed test: record the numbers in docs/benchmarks.md with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address

from agent.redirect.command import node_reconciler
from agent.redirect.reconciler import RedirectReconciler
from agent.redirect.ruleset import PodIp
from agent.settings import PortSettings, RedirectSettings

NETNS = "ambench-redirect"
FIRST_POD = IPv4Address("10.200.0.10")


@dataclass(frozen=True)
class Timing:
    """One operation's measurements."""

    operation: str
    runs: int
    p50_ms: float
    p90_ms: float
    cpu_ms: float
    """User + system CPU per run, this process and its waited-for children (nft)."""


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _measure(operation: str, runs: int, step: Callable[[int], None], prepare: Callable[[], None]) -> Timing:
    """Times `step(i)` for each run, after `prepare()` (untimed) set up its starting state."""
    walls: list[float] = []
    cpu = 0.0
    for i in range(runs):
        prepare()
        cpu_before, started = _cpu_seconds(), time.perf_counter()
        step(i)
        walls.append(time.perf_counter() - started)
        cpu += _cpu_seconds() - cpu_before
    deciles = statistics.quantiles(walls, n=10) if runs > 1 else walls * 9
    return Timing(operation, runs, statistics.median(walls) * 1e3, deciles[8] * 1e3, cpu / runs * 1e3)


def measure_inside(pod_count: int, runs: int) -> list[Timing]:
    """Runs the operations in the current network namespace (a throwaway one)."""
    settings = RedirectSettings()
    enrolled: frozenset[PodIp] = frozenset(FIRST_POD + i for i in range(pod_count))
    extra = [FIRST_POD + pod_count + i for i in range(runs)]
    reconciler: RedirectReconciler = node_reconciler(settings, PortSettings())
    reconciler.reconcile(enrolled)

    def back_to_enrolled() -> None:
        reconciler.update_pods(enrolled)

    def remove_table() -> None:
        subprocess.run(["nft", "delete", "table", "inet", settings.table_name], check=True)

    return [
        _measure(
            "add one pod (incremental)",
            runs,
            lambda i: _expect_change(reconciler.update_pods(enrolled | {extra[i]}).add_pods),
            back_to_enrolled,
        ),
        _measure(
            "remove one pod (incremental)",
            runs,
            lambda i: _expect_change(reconciler.update_pods(enrolled - {FIRST_POD + i}).remove_pods),
            back_to_enrolled,
        ),
        _measure(
            "add one pod (full pass)",
            runs,
            lambda i: _expect_change(reconciler.reconcile(enrolled | {extra[i]}).add_pods),
            back_to_enrolled,
        ),
        _measure(
            "drift check, nothing to do (full pass)",
            runs,
            lambda _: _expect_no_change(reconciler.reconcile(enrolled).empty),
            back_to_enrolled,
        ),
        _measure(
            f"install table with {pod_count} pods (full replace)",
            runs,
            lambda _: _expect_change(reconciler.reconcile(enrolled).replace_table),
            remove_table,
        ),
    ]


def _expect_change(changed: object) -> None:
    if not changed:
        raise RuntimeError("the operation changed nothing: the benchmark measures the wrong thing")


def _expect_no_change(empty: bool) -> None:
    if not empty:
        raise RuntimeError("the drift check changed something: the benchmark measures the wrong thing")


def _nft_version() -> str:
    return subprocess.run(["nft", "--version"], capture_output=True, text=True, check=True).stdout.strip()


def report(timings: Sequence[Timing], pod_count: int) -> str:
    """The table, with what it ran on and the command that produced it."""
    lines = [
        f"redirect reconcile on a node with {pod_count} enrolled pods"
        f" ({_nft_version()}, kernel {platform.release()}, {os.cpu_count()} CPUs)",
        "",
        f"| {'operation':<44} | runs | p50 ms | p90 ms | CPU ms/op |",
        f"|{'-' * 46}|------|--------|--------|-----------|",
    ]
    lines += [
        f"| {t.operation:<44} | {t.runs:>4} | {t.p50_ms:>6.1f} | {t.p90_ms:>6.1f} | {t.cpu_ms:>9.1f} |"
        for t in timings
    ]
    lines += ["", f"command: python -m benchmarks.bench_redirect --pods {pod_count} --runs {timings[0].runs}"]
    return "\n".join(lines)


def _ip_netns(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", "netns", *args], check=check, capture_output=True)


def run_outside(pod_count: int, runs: int) -> int:
    """Creates the throwaway namespace, runs the measurement inside it, prints the table."""
    _ip_netns("delete", NETNS, check=False)
    _ip_netns("add", NETNS)
    try:
        _ip_netns("exec", NETNS, "ip", "link", "set", "lo", "up")
        inside = subprocess.run(
            [
                *("ip", "netns", "exec", NETNS, sys.executable, "-m", "benchmarks.bench_redirect"),
                *("--inside", "--pods", str(pod_count), "--runs", str(runs)),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        _ip_netns("delete", NETNS, check=False)
    if inside.returncode != 0:
        print(inside.stderr, file=sys.stderr)
        return inside.returncode
    timings = [Timing(**t) for t in json.loads(inside.stdout)]
    print(report(timings, pod_count))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_redirect", description=__doc__)
    parser.add_argument("--pods", type=int, default=500, help="enrolled pods on the node (default 500)")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per operation (default 50)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the benchmark needs root: it creates a network namespace", file=sys.stderr)
        return 1
    if args.inside:
        print(json.dumps([t.__dict__ for t in measure_inside(args.pods, args.runs)]))
        return 0
    return run_outside(args.pods, args.runs)


if __name__ == "__main__":
    sys.exit(main())
