"""Discovery benchmark: one agent's cluster-wide watch against a large cluster (issue 6, "Scale").

`make bench` runs `python -m benchmarks.bench_discovery`: it starts a one-node local cluster (the e2e
harness, its own prefix), stops the controller-manager and scheduler (objects only: nothing must
garbage-collect pods bound to nodes that do not exist), and loads the API server with `--pods` pods
over `--nodes` node names, `--namespaces` namespaces and `--services` services (aiohttp, 48 requests
in flight). Each pod is created with `spec.nodeName` set and then given a Running/Ready status with a
pod IP through the status subresource, so the agent treats it as running. The policy CRDs are
installed, so the agent watches every kind it watches in a cluster.

Then it starts this file's `agent` subcommand as a separate process: `Discovery` + `ClusterIndex`
publishing snapshots, as `ambient-agent node` runs them, measuring in that process:

- first full sync: wall time and CPU seconds from start to the first published snapshot; RSS then;
- under `--rate` label patches per second for `--churn-s` seconds (each writes its send time into a
  label of one of `--pool` pods): the delay from the write to the first snapshot that holds it, p50 /
  p99 / max, and the time to build each snapshot.

It prints a table and the command; record it in docs/benchmarks.md. Not a timed test.
Targets (issue 6): sync <= 15 s, RSS after sync <= 150 MB, p99 write-to-snapshot delay <= 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

WRITE_LABEL = "bench-write"
_POD_NET = int(IPv4Address("10.128.0.0"))
_NODE_NET = int(IPv4Address("10.250.0.0"))
_IN_FLIGHT = 48


def pod_ip(index: int) -> str:
    return str(IPv4Address(_POD_NET + index + 1))


def pod_name(index: int, namespaces: int) -> tuple[str, str]:
    return f"bench-{index % namespaces:03d}", f"pod-{index:06d}"


# The agent side (a separate process).


def run_agent(args: argparse.Namespace) -> None:
    """Runs discovery until stdin closes; prints one JSON line when synced and one at the end."""
    from agent.operator.discovery import ClusterIndex, Discovery
    from agent.operator.kubeapi import load_api_access
    from agent.state import Snapshot

    pool = {IPv4Address(pod_ip(index)) for index in range(args.pool)}
    seen: dict[IPv4Address, str] = {}
    delays: list[float] = []
    builds: list[float] = []
    started, started_cpu = time.monotonic(), time.process_time()
    synced = asyncio.Event()

    class TimedIndex(ClusterIndex):
        def snapshot(self, created_at: float) -> Snapshot:
            began = time.perf_counter()
            snapshot = super().snapshot(created_at)
            builds.append(time.perf_counter() - began)
            return snapshot

    def published(snapshot: Snapshot) -> None:
        now = time.time()
        if not synced.is_set():
            synced.set()
            report = {
                "sync_s": time.monotonic() - started,
                "sync_cpu_s": time.process_time() - started_cpu,
                "rss_mb": _proc_status_mb("VmRSS"),
                "peak_rss_mb": _proc_status_mb("VmHWM"),
                "first_build_s": builds[-1],
                "workloads": len(snapshot.workloads_by_ip),
                "service_ports": len(snapshot.services_by_address),
            }
            print(json.dumps(report), flush=True)
            builds.clear()
        for ip in pool:
            workload = snapshot.workload(ip)
            written = None if workload is None else workload.labels.get(WRITE_LABEL)
            if written is not None and seen.get(ip) != written:
                seen[ip] = written
                delays.append(now - int(written) / 1e9)

    async def main() -> None:
        index = TimedIndex()
        discovery = Discovery(load_api_access(args.kubeconfig), index, published)
        task = asyncio.create_task(discovery.run())
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)
        task.cancel()
        churn_cpu = time.process_time()
        print(
            json.dumps(
                {
                    "delays_s": delays,
                    "builds_s": builds,
                    "rss_mb": _proc_status_mb("VmRSS"),
                    "cpu_s": churn_cpu - started_cpu,
                }
            ),
            flush=True,
        )

    asyncio.run(main())


def _proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# The loading side.


class Loader:
    """Creates and patches objects with `_IN_FLIGHT` requests in flight."""

    def __init__(self, kubeconfig: str) -> None:
        from agent.operator.kubeapi import load_api_access

        self._access = load_api_access(kubeconfig)
        self._limit = asyncio.Semaphore(_IN_FLIGHT)
        self.failures = 0

    async def __aenter__(self) -> Loader:
        import aiohttp

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._access.ssl_context(), limit=_IN_FLIGHT)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    async def call(self, method: str, path: str, body: dict[str, Any]) -> None:
        headers = {
            **self._access.auth_headers(),
            "Content-Type": "application/merge-patch+json" if method == "PATCH" else "application/json",
        }
        async with (
            self._limit,
            self._session.request(
                method, self._access.server + path, data=json.dumps(body), headers=headers
            ) as response,
        ):
            await response.read()
            if response.status not in (200, 201, 409):
                self.failures += 1
                if self.failures <= 5:
                    print(f"{method} {path}: HTTP {response.status}", file=sys.stderr)

    async def all(self, calls: Sequence[tuple[str, str, dict[str, Any]]], what: str) -> float:
        began = time.monotonic()
        batch = 2000
        for start in range(0, len(calls), batch):
            await asyncio.gather(*(self.call(*call) for call in calls[start : start + batch]))
        elapsed = time.monotonic() - began
        print(f"{what}: {len(calls)} in {elapsed:.1f}s ({len(calls) / elapsed:.0f}/s)", file=sys.stderr)
        return elapsed


async def load(args: argparse.Namespace, kubeconfig: str) -> dict[str, float]:
    async with Loader(kubeconfig) as loader:
        namespaces = [f"bench-{n:03d}" for n in range(args.namespaces)]
        await loader.all(
            [("POST", "/api/v1/namespaces", {"metadata": {"name": ns}}) for ns in namespaces], "namespaces"
        )
        await loader.all(
            [
                ("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": "default"}})
                for ns in namespaces
            ],
            "service accounts",
        )
        apps_per_namespace = max(1, args.services // args.namespaces)
        services = [
            (
                "POST",
                f"/api/v1/namespaces/{namespaces[s % args.namespaces]}/services",
                {
                    "metadata": {"name": f"svc-{s:05d}"},
                    "spec": {
                        "selector": {"app": f"app-{(s // args.namespaces) % apps_per_namespace}"},
                        "ports": [{"port": 80, "targetPort": "http"}],
                    },
                },
            )
            for s in range(args.services)
        ]
        rates = {"services_s": await loader.all(services, "services")}
        creates, statuses = [], []
        for index in range(args.pods):
            ns, name = pod_name(index, args.namespaces)
            node = index % args.nodes
            app = f"app-{(index // args.namespaces) % apps_per_namespace}"
            creates.append(
                (
                    "POST",
                    f"/api/v1/namespaces/{ns}/pods",
                    {
                        "metadata": {"name": name, "labels": {"app": app, "pod-template-hash": "5d8f7c9b6"}},
                        "spec": {
                            "nodeName": f"bench-node-{node:04d}",
                            "automountServiceAccountToken": False,
                            "containers": [
                                {
                                    "name": "app",
                                    "image": "bench:1",
                                    "ports": [{"name": "http", "containerPort": 8080}],
                                }
                            ],
                        },
                    },
                )
            )
            statuses.append(
                (
                    "PATCH",
                    f"/api/v1/namespaces/{ns}/pods/{name}/status",
                    {
                        "status": {
                            "phase": "Running",
                            "podIP": pod_ip(index),
                            "podIPs": [{"ip": pod_ip(index)}],
                            "hostIP": str(IPv4Address(_NODE_NET + node + 1)),
                            "conditions": [{"type": "Ready", "status": "True"}],
                        }
                    },
                )
            )
        rates["pods_s"] = await loader.all(creates, "pod creates")
        rates["statuses_s"] = await loader.all(statuses, "status patches")
        rates["failures"] = loader.failures
        return rates


async def churn(args: argparse.Namespace, kubeconfig: str) -> int:
    """Label patches at `args.rate` per second for `args.churn_s` seconds; returns how many were sent."""
    async with Loader(kubeconfig) as loader:
        sent, tasks = 0, set()
        began = time.monotonic()
        while (elapsed := time.monotonic() - began) < args.churn_s:
            ns, name = pod_name(sent % args.pool, args.namespaces)
            body = {"metadata": {"labels": {WRITE_LABEL: str(time.time_ns())}}}
            task = asyncio.create_task(loader.call("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}", body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
            await asyncio.sleep(max(0.0, sent / args.rate - elapsed))
        await asyncio.gather(*tasks)
        return sent


def run(args: argparse.Namespace) -> int:
    from tests.e2e.cluster import Cluster, Layout
    from tests.e2e.cluster.controlplane import stop_component

    layout = Layout(
        prefix=args.prefix, state_dir=Path("/run/ambient-agent") / f"bench-{args.prefix}", node_count=1
    )
    print(f"starting a one-node cluster (prefix {args.prefix}) ...", file=sys.stderr, flush=True)
    cluster = Cluster.up(layout)
    agent: subprocess.Popen[str] | None = None
    try:
        repo = Path(__file__).resolve().parent.parent
        for crd in sorted((repo / "manifests" / "crds").glob("*.yaml")):
            cluster.apply(crd)
        for component in ("kube-controller-manager", "kube-scheduler"):
            stop_component(layout, component)
        loading = asyncio.run(load(args, str(cluster.kubeconfig)))
        apiserver_rss = _apiserver_rss_mb(layout.control_plane_netns)
        print("starting the agent's discovery ...", file=sys.stderr, flush=True)
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.bench_discovery",
                "agent",
                "--kubeconfig",
                str(cluster.kubeconfig),
                "--pool",
                str(args.pool),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=repo,
        )
        assert agent.stdin is not None
        assert agent.stdout is not None
        sync = json.loads(agent.stdout.readline())
        print(f"synced: {sync}", file=sys.stderr, flush=True)
        sent = asyncio.run(churn(args, str(cluster.kubeconfig)))
        time.sleep(1.0)
        agent.stdin.close()
        final = json.loads(agent.stdout.readline())
        agent.wait(timeout=30)
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
        cluster.down()
    print(report(args, loading, apiserver_rss, sync, final, sent))
    return 0


def _apiserver_rss_mb(netns_name: str) -> float:
    from tests.e2e.cluster import netns

    for pid in netns.pids_in(netns_name):
        try:
            if b"kube-apiserver" in Path(f"/proc/{pid}/cmdline").read_bytes():
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            continue
    return float("nan")


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def report(  # noqa: PLR0917 (one call site, every part of the run)
    args: argparse.Namespace,
    loading: dict[str, float],
    apiserver_rss: float,
    sync: dict[str, float],
    final: dict[str, Any],
    sent: int,
) -> str:
    delays_ms = [delay * 1000 for delay in final["delays_s"]]
    builds_ms = [build * 1000 for build in final["builds_s"]]
    p99 = _percentile(delays_ms, 0.99)
    rows = [
        ("first full sync (s)", f"{sync['sync_s']:.1f}", "<= 15", sync["sync_s"] <= 15),
        ("CPU for the sync (s)", f"{sync['sync_cpu_s']:.1f}", "", None),
        ("first snapshot build (s)", f"{sync['first_build_s']:.2f}", "", None),
        ("RSS after sync (MB)", f"{sync['rss_mb']:.0f}", "<= 150", sync["rss_mb"] <= 150),
        ("peak RSS during sync (MB)", f"{sync['peak_rss_mb']:.0f}", "", None),
        ("RSS after churn (MB)", f"{final['rss_mb']:.0f}", "", None),
        (
            f"write -> snapshot delay p50 / p99 / max (ms), {len(delays_ms)} of {sent} writes seen",
            f"{_percentile(delays_ms, 0.5):.0f} / {p99:.0f} / {max(delays_ms, default=float('nan')):.0f}",
            "p99 <= 100",
            p99 <= 100,
        ),
        (
            "snapshot build under churn p50 / p99 (ms)",
            f"{_percentile(builds_ms, 0.5):.1f} / {_percentile(builds_ms, 0.99):.1f}",
            "",
            None,
        ),
    ]
    lines = [
        f"command: {shlex.join(['python', '-m', 'benchmarks.bench_discovery', *sys.argv[1:]])}",
        f"machine: {platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()},"
        f" Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}",
        f"cluster: {args.pods} pods over {args.nodes} node names, {args.namespaces} namespaces,"
        f" {args.services} services; loaded in {loading['pods_s']:.0f} s (creates) +"
        f" {loading['statuses_s']:.0f} s (status), {loading['failures']:.0f} failed requests;"
        f" API server RSS {apiserver_rss:.0f} MB",
        f"churn: {args.rate}/s label patches for {args.churn_s} s over {args.pool} pods;"
        f" {len(builds_ms)} snapshots published",
        "",
        "| measure | value | target | met |",
        "|---|---|---|---|",
    ]
    for name, value, target, met in rows:
        lines.append(f"| {name} | {value} | {target} | {'' if met is None else ('yes' if met else 'NO')} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_discovery", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    parser.set_defaults(command="run")
    parser.add_argument("--prefix", default="aas", help="cluster prefix (default aas)")
    parser.add_argument("--pods", type=int, default=50_000)
    parser.add_argument("--nodes", type=int, default=1_000, help="node names the pods are bound to")
    parser.add_argument("--namespaces", type=int, default=500)
    parser.add_argument("--services", type=int, default=5_000)
    parser.add_argument("--rate", type=float, default=100.0, help="pod label patches per second")
    parser.add_argument("--churn-s", type=float, default=30.0, help="how long to patch")
    parser.add_argument("--pool", type=int, default=500, help="pods the patches cycle over")
    agent = commands.add_parser("agent", help="(internal) the measured discovery process")
    agent.add_argument("--kubeconfig", required=True)
    agent.add_argument("--pool", type=int, default=500)
    args = parser.parse_args(argv)
    if args.command == "agent":
        run_agent(args)
        return 0
    if os.geteuid() != 0:
        print("the benchmark needs root: it creates network namespaces", file=sys.stderr)
        return 1
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
