"""Data-plane benchmark: the HBONE path between two node namespaces against direct pod-to-pod TCP.

`make bench` runs `python -m benchmarks.bench_dataplane`: it starts a two-node local cluster (the
e2e harness, its own prefix), runs a benchmark server in two pods on node-2 and the measuring client
in two pods on node-1, one pair enrolled (captured by `ambient-agent node` on both nodes, tunnelled
over mutual TLS) and one pair not (direct TCP, the agents never see it), and measures both in the
same run:

- throughput: one stream, client to server, MB/s (median of the rounds);
- request/response: 1 KiB each way over one open connection, round-trip p50/p99;
- new connection: connect, then the first 1 KiB exchange, p50/p99 (through the mesh, over a warm
  pool: the HBONE connection between the agents already exists);
- agent CPU: user + system seconds of both agents, from /proc, per GB relayed by the throughput runs,
  and per request/response round trip and per new connection (microseconds, both agents together).

It prints a table and the command. Not a timed test: numbers vary with the machine's load; record
them in docs/benchmarks.md with the command. The client and server are this file's `measure` and
`serve` subcommands, run inside the pods.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import socketserver
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SERVER_PORT = 5000
REQUEST_SIZE = 1024
_CHUNK = 1024 * 1024
_THROUGHPUT = b"T"
_REQUEST_RESPONSE = b"R"


# In the server pods.


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mode = sock.recv(1)
        if mode == _THROUGHPUT:
            buffer = bytearray(_CHUNK)
            total = 0
            while count := sock.recv_into(buffer):
                total += count
            sock.sendall(total.to_bytes(8, "big"))
        elif mode == _REQUEST_RESPONSE:
            reply = bytes(REQUEST_SIZE)
            while _receive_exactly(sock, REQUEST_SIZE):
                sock.sendall(reply)


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024


def serve(port: int) -> None:
    """Serves throughput (`T`: count until EOF, answer the count) and request/response (`R`)."""
    with _Server(("0.0.0.0", port), _Handler) as server:
        print(f"listening on {port}", flush=True)
        server.serve_forever()


def _receive_exactly(sock: socket.socket, size: int) -> bool:
    view = memoryview(bytearray(size))
    received = 0
    while received < size:
        count = sock.recv_into(view[received:])
        if not count:
            return False
        received += count
    return True


# In the client pods.


def _connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def measure_throughput(host: str, port: int, size: int) -> dict[str, float]:
    """One stream of `size` bytes to the server; MB/s from the first byte to the server's count."""
    chunk = os.urandom(_CHUNK)
    with _connect(host, port) as sock:
        sock.sendall(_THROUGHPUT)
        started = time.perf_counter()
        remaining = size
        while remaining > 0:
            remaining -= sock.send(chunk[: min(remaining, _CHUNK)])
        sock.shutdown(socket.SHUT_WR)
        answer = sock.recv(8)
        elapsed = time.perf_counter() - started
    counted = int.from_bytes(answer, "big")
    if counted != size:
        raise SystemExit(f"throughput: the server counted {counted} bytes of {size}")
    return {"bytes": size, "seconds": elapsed, "mb_per_s": size / elapsed / 1e6}


def measure_request_response(host: str, port: int, rounds: int) -> dict[str, float]:
    """`rounds` 1 KiB requests answered by 1 KiB over one connection; round-trip percentiles in µs."""
    request = bytes(REQUEST_SIZE)
    times = []
    with _connect(host, port) as sock:
        sock.sendall(_REQUEST_RESPONSE)
        for index in range(rounds + rounds // 10):
            started = time.perf_counter_ns()
            sock.sendall(request)
            if not _receive_exactly(sock, REQUEST_SIZE):
                raise SystemExit("request/response: the server closed the connection")
            if index >= rounds // 10:  # the first tenth warms up both ends
                times.append((time.perf_counter_ns() - started) / 1000)
    return _percentiles(times)


def measure_new_connections(host: str, port: int, count: int) -> dict[str, float]:
    """`count` sequential new connections, each timed from connect to its first 1 KiB answer, in µs."""
    request = _REQUEST_RESPONSE + bytes(REQUEST_SIZE)
    times = []
    for _ in range(count):
        started = time.perf_counter_ns()
        with _connect(host, port) as sock:
            sock.sendall(request)
            if not _receive_exactly(sock, REQUEST_SIZE):
                raise SystemExit("new connection: the server closed the connection")
            times.append((time.perf_counter_ns() - started) / 1000)
    return _percentiles(times)


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "p50_us": ordered[len(ordered) // 2],
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
    }


def measure(kind: str, host: str, port: int, amount: int) -> None:
    """Runs one measurement and prints it as one JSON line."""
    runners = {
        "throughput": measure_throughput,
        "request-response": measure_request_response,
        "new-connection": measure_new_connections,
    }
    print(json.dumps(runners[kind](host, port, amount)))


# The orchestration, in the root namespace.


@dataclass
class PathResult:
    name: str
    throughput_mb_s: float
    rr_p50_us: float
    rr_p99_us: float
    connect_p50_us: float
    connect_p99_us: float
    relay_cpu_s_per_gb: float | None
    """User + system CPU of the relay processes (both agents, or both haproxys) per GB relayed."""
    relay_cpu_us_per_round_trip: float | None
    """The same relays' CPU per 1 KiB request/response round trip, in µs."""
    relay_cpu_us_per_connection: float | None
    """The same relays' CPU per new connection (with its first 1 KiB exchange), in µs."""
    throughput_rounds: list[float]
    """MB/s of each throughput stream, in order (the spread shows how noisy the machine was)."""


HAPROXY_PLAIN_PORT = 16001
HAPROXY_TLS_PORT = 16443


def haproxy_config(bind: str, target: str, tls_bind: str = "", tls_target: str = "") -> str:
    """One side of a haproxy TLS relay pair: TCP mode, one thread, 256 KiB buffers, TLS 1.3 mutual."""
    return "\n".join(
        [
            "global",
            "  nbthread 1",
            "  tune.bufsize 262144",
            "defaults",
            "  mode tcp",
            "  timeout connect 5s",
            "  timeout client 120s",
            "  timeout server 120s",
            "frontend relay",
            f"  bind {bind} {tls_bind}",
            "  default_backend next",
            "backend next",
            f"  server next {target} {tls_target}",
            "",
        ]
    )


def run(args: argparse.Namespace) -> int:
    import shutil
    import subprocess

    from agent.identity.testing import EphemeralCa
    from tests.e2e.cluster import Cluster, Layout, NodeHandle, PodHandle
    from tests.e2e.mesh import (
        MeshWorkload,
        cpu_seconds,
        remove_capture,
        spiffe_id,
        start_agent,
        write_static_config,
    )

    if args.attach:
        cluster = Cluster.attach(args.attach)
    else:
        layout = Layout(prefix=args.prefix, state_dir=Path("/run/ambient-agent") / f"bench-{args.prefix}")
        print(f"starting a two-node cluster (prefix {args.prefix}) ...", file=sys.stderr, flush=True)
        cluster = Cluster.up(layout)
    work_dir = cluster.layout.state_dir / "bench"
    agent_env = {"AMBIENT_LOG_LEVEL": "warning", "AMBIENT_EVENT_LOOP": args.event_loop}
    agents = []
    haproxys: list[subprocess.Popen[str]] = []
    pods: list[PodHandle] = []
    try:
        node1, node2 = cluster.nodes[:2]
        server_command = ["python", "-m", "benchmarks.bench_dataplane", "serve", "--port", str(SERVER_PORT)]
        ambient = {"istio.io/dataplane-mode": "ambient"}

        def pod(name: str, node: NodeHandle, command: list[str], enrolled: bool) -> PodHandle:
            handle = cluster.create_pod(
                name,
                "bench",
                node,
                command=command,
                labels=ambient if enrolled else {},
                service_account=name if enrolled else None,
            )
            pods.append(handle)
            return handle

        direct_client = pod("direct-client", node1, ["sleep", "infinity"], enrolled=False)
        direct_server = pod("direct-server", node2, server_command, enrolled=False)
        mesh_client = pod("mesh-client", node1, ["sleep", "infinity"], enrolled=True)
        mesh_server = pod("mesh-server", node2, server_command, enrolled=True)
        ca = EphemeralCa.create()
        workloads = [
            MeshWorkload(direct_client, "default", enrolled=False),
            MeshWorkload(direct_server, "default", enrolled=False),
            MeshWorkload(mesh_client, "mesh-client", enrolled=True),
            MeshWorkload(mesh_server, "mesh-server", enrolled=True),
        ]
        for node, hosted in ((node1, mesh_client), (node2, mesh_server)):
            config = write_static_config(
                work_dir / node.name,
                node=node,
                bundle=ca.bundle,
                certificates=[ca.issue(spiffe_id("bench", hosted.name))],
                workloads=workloads,
            )
            agents.append(start_agent(cluster, node, config, env=agent_env, python=args.agent_python))

        with_haproxy = shutil.which("haproxy") is not None
        if with_haproxy:
            (work_dir / "bundle.pem").write_bytes(ca.bundle.to_pem())
            for name in ("haproxy-client", "haproxy-server"):
                credential = ca.issue(spiffe_id("bench", name))
                (work_dir / f"{name}.pem").write_bytes(credential.chain_pem() + credential.key_pem())
            tls = f"ca-file {work_dir / 'bundle.pem'} verify required ssl-min-ver TLSv1.3"
            sides = [
                (
                    node2,
                    haproxy_config(
                        f"{node2.ip}:{HAPROXY_TLS_PORT}",
                        f"{direct_server.ip}:{SERVER_PORT}",
                        tls_bind=f"ssl crt {work_dir / 'haproxy-server.pem'} {tls}",
                    ),
                ),
                (
                    node1,
                    haproxy_config(
                        f"{node1.ip}:{HAPROXY_PLAIN_PORT}",
                        f"{node2.ip}:{HAPROXY_TLS_PORT}",
                        tls_target=f"ssl crt {work_dir / 'haproxy-client.pem'} {tls}",
                    ),
                ),
            ]
            for node, text in sides:
                config_path = work_dir / f"haproxy-{node.name}.cfg"
                config_path.write_text(text)
                with open(cluster.layout.log_dir / f"haproxy-{node.name}.log", "w") as log_file:
                    haproxys.append(
                        cluster.spawn_in(
                            node.netns,
                            ["haproxy", "-db", "-f", str(config_path)],
                            stdout=log_file,
                            stderr=log_file,
                        )
                    )
        else:
            print("haproxy is not installed: no C relay row (apt-get install haproxy)", file=sys.stderr)
        for agent in agents:
            agent.wait_ready()

        def measured(client: PodHandle, host: str, port: int, kind: str, amount: int) -> dict[str, float]:
            argv = [
                "python",
                "-m",
                "benchmarks.bench_dataplane",
                "measure",
                kind,
                host,
                str(amount),
                "--port",
                str(port),
            ]
            result = cluster.run_in(client.netns, argv, timeout=600)
            values: dict[str, float] = json.loads(result.stdout.splitlines()[-1])
            return values

        def path(name: str, client: PodHandle, host: str, port: int, relays: list[int]) -> PathResult:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            measured(client, host, port, "new-connection", 20)  # warm-up: pools, caches, ARP
            rates, cpu, relayed = [], 0.0, 0
            for _ in range(args.rounds):
                before = sum(cpu_seconds(pid) for pid in relays)
                result = measured(client, host, port, "throughput", args.bytes)
                cpu += sum(cpu_seconds(pid) for pid in relays) - before
                relayed += args.bytes
                rates.append(result["mb_per_s"])
            before = sum(cpu_seconds(pid) for pid in relays)
            rr = measured(client, host, port, "request-response", args.requests)
            rr_cpu = sum(cpu_seconds(pid) for pid in relays) - before
            before = sum(cpu_seconds(pid) for pid in relays)
            connect = measured(client, host, port, "new-connection", args.connections)
            connect_cpu = sum(cpu_seconds(pid) for pid in relays) - before
            round_trips = args.requests + args.requests // 10  # the warm-up tenth included
            return PathResult(
                name=name,
                throughput_mb_s=statistics.median(rates),
                rr_p50_us=rr["p50_us"],
                rr_p99_us=rr["p99_us"],
                connect_p50_us=connect["p50_us"],
                connect_p99_us=connect["p99_us"],
                relay_cpu_s_per_gb=cpu / (relayed / 1e9) if relays else None,
                relay_cpu_us_per_round_trip=rr_cpu / round_trips * 1e6 if relays else None,
                relay_cpu_us_per_connection=connect_cpu / args.connections * 1e6 if relays else None,
                throughput_rounds=rates,
            )

        results = [
            path("direct pod-to-pod TCP", direct_client, direct_server.ip, SERVER_PORT, []),
            path(
                "ambient-agent HBONE (mTLS, HTTP/2 CONNECT, pooled)",
                mesh_client,
                mesh_server.ip,
                SERVER_PORT,
                [agent.process.pid for agent in agents],
            ),
        ]
        if with_haproxy:
            results.append(
                path(
                    "haproxy TLS relay pair (C, TLS 1.3 mutual, one TLS connection per TCP connection)",
                    direct_client,
                    node1.ip,
                    HAPROXY_PLAIN_PORT,
                    [process.pid for process in haproxys],
                )
            )
    finally:
        for agent in agents:
            agent.stop()
        for process in haproxys:
            process.terminate()
            process.wait()
        if args.attach:
            for handle in pods:
                cluster.delete_pod(handle, wait=False)
            for node in cluster.nodes:
                remove_capture(cluster, node)
        else:
            cluster.down()
    print(report(results, args))
    return 0


def report(results: Sequence[PathResult], args: argparse.Namespace) -> str:
    direct, *others = results
    lines = [
        f"command: {shlex.join(['python', '-m', 'benchmarks.bench_dataplane', *sys.argv[1:]])}",
        f"machine: {platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()},"
        f" Python {platform.python_version()}; agents' event loop: {args.event_loop}",
        f"agents' interpreter: {args.agent_python} ({interpreter_version(args.agent_python)})",
        f"throughput: {args.bytes // 2**20} MiB per stream, median of {args.rounds};"
        f" request/response: {args.requests} x 1 KiB; new connections: {args.connections}",
        "",
        "| path | throughput MB/s | 1 KiB RTT p50 / p99 (us) | new connection p50 / p99 (us) "
        "| relay CPU s per GB | relay CPU per round trip / per new connection (us) |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        cpu = "-" if result.relay_cpu_s_per_gb is None else f"{result.relay_cpu_s_per_gb:.2f}"
        per_op = (
            "-"
            if result.relay_cpu_us_per_round_trip is None or result.relay_cpu_us_per_connection is None
            else f"{result.relay_cpu_us_per_round_trip:.0f} / {result.relay_cpu_us_per_connection:.0f}"
        )
        lines.append(
            f"| {result.name} | {result.throughput_mb_s:.0f}"
            f" | {result.rr_p50_us:.0f} / {result.rr_p99_us:.0f}"
            f" | {result.connect_p50_us:.0f} / {result.connect_p99_us:.0f} | {cpu} | {per_op} |"
        )
    lines.append("")
    for result in others:
        lines.append(
            f"{result.name}: throughput {result.throughput_mb_s / direct.throughput_mb_s:.0%} of direct,"
            f" added RTT p50 {result.rr_p50_us - direct.rr_p50_us:.0f} us,"
            f" new connection p50 {result.connect_p50_us / 1000:.2f} ms"
        )
    for result in results:
        rounds = ", ".join(f"{rate:.0f}" for rate in result.throughput_rounds)
        lines.append(f"{result.name}: throughput rounds {rounds} MB/s")
    agent, *c_peers = others
    lines.append(
        "targets for ambient-agent: throughput >= 25% of direct, added RTT p50 <= 150 us,"
        " new connection over a warm pool p50 <= 1 ms"
    )
    for peer in c_peers:
        lines.append(
            f"ambient-agent throughput / haproxy: {agent.throughput_mb_s / peer.throughput_mb_s:.0%}"
        )
    return "\n".join(lines)


def interpreter_version(python: str) -> str:
    """`python`'s version and build, as `sys.version` puts them on one line."""
    import subprocess

    probe = [python, "-c", "import sys; print(' '.join(sys.version.split()))"]
    return subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_dataplane", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    parser.set_defaults(command="run")
    parser.add_argument("--prefix", default="aabench", help="cluster prefix (default aabench)")
    parser.add_argument("--bytes", type=int, default=1024 * 2**20, help="bytes per throughput stream")
    parser.add_argument("--rounds", type=int, default=3, help="throughput streams per path")
    parser.add_argument("--requests", type=int, default=5000, help="1 KiB request/response rounds")
    parser.add_argument("--connections", type=int, default=500, help="new connections timed")
    parser.add_argument(
        "--event-loop", choices=["auto", "asyncio"], default="auto", help="the agents' AMBIENT_EVENT_LOOP"
    )
    parser.add_argument(
        "--attach", type=Path, metavar="STATE_DIR", help="use a running cluster (make cluster-up) instead"
    )
    parser.add_argument(
        "--agent-python",
        default=os.environ.get("AMBIENT_BENCH_AGENT_PYTHON", sys.executable),
        help="the interpreter running the agents (default: env AMBIENT_BENCH_AGENT_PYTHON, else this"
        " one); `make bench` passes the image's (Debian's python3, in .venv-image)",
    )
    server = commands.add_parser("serve", help="(inside a pod) the benchmark server")
    server.add_argument("--port", type=int, default=SERVER_PORT)
    client = commands.add_parser("measure", help="(inside a pod) one measurement, as JSON")
    client.add_argument("kind", choices=["throughput", "request-response", "new-connection"])
    client.add_argument("host")
    client.add_argument("amount", type=int, help="bytes, rounds or connections")
    client.add_argument("--port", type=int, default=SERVER_PORT)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.port)
        return 0
    if args.command == "measure":
        measure(args.kind, args.host, args.port, args.amount)
        return 0
    if os.geteuid() != 0:
        print("the benchmark needs root: it creates network namespaces", file=sys.stderr)
        return 1
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
