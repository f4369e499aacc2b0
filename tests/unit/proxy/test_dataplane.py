"""The data plane end to end on loopback: two nodes in one process, real TLS, real sockets.

Needs root: upstream sockets carry SO_MARK and deliver from the client's IP with IP_TRANSPARENT.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import random
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable

import pytest

from agent.hbone import HboneSettings
from agent.identity.testing import EphemeralCa
from agent.identity.tls import client_context
from agent.proxy.config import DataPlaneSettings
from agent.proxy.dataplane import ListenerKind, bind_listeners
from agent.proxy.hbone_driver import HboneStreamEnd
from agent.proxy.sockets import Address, SocketSetupError
from agent.settings import PortSettings, SettingsError
from tests.unit.proxy.mesh import (
    ECHO_IP,
    OUTSIDER_IP,
    SERVICE_IPS,
    SERVICE_PORT,
    SLEEP_IP,
    Firehose,
    deny_from,
    running_mesh,
    spiffe,
    strict_mtls,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK and IP_TRANSPARENT need root"),
    pytest.mark.timeout(60),
]

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
WAIT_S = 10.0
"""Upper bound for anything a test waits for; reached only when the behaviour is broken."""


async def eventually(condition: Callable[[], bool | Awaitable[bool]]) -> None:
    """Waits until `condition` holds (it is polled), failing after WAIT_S."""
    async with asyncio.timeout(WAIT_S):
        while True:
            result = condition()
            if result if isinstance(result, bool) else await result:
                return
            await asyncio.sleep(0.01)


async def read_greeting(reader: asyncio.StreamReader) -> str:
    """The echo server's `peer <ip> <port>` line: the client address it saw."""
    async with asyncio.timeout(WAIT_S):
        return (await reader.readline()).decode().strip()


async def finish(streams: Streams, payload: bytes) -> bytes:
    """Sends `payload`, half-closes, and reads until the server closes."""
    reader, writer = streams
    writer.write(payload)
    writer.write_eof()
    async with asyncio.timeout(WAIT_S):
        data = await reader.read()
    writer.close()
    return data


async def exchange(streams: Streams, payload: bytes) -> tuple[str, bytes]:
    """`finish` on a new connection: the echo server's greeting, and the echo."""
    greeting, _, echoed = (await finish(streams, payload)).partition(b"\n")
    return greeting.decode(), echoed


async def expect_reset(streams: Streams) -> None:
    """The connection ends with a TCP reset (not a hang, not a clean close)."""
    reader, writer = streams
    writer.write(b"anyone?")
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(WAIT_S):
            await reader.read()
    writer.close()


def peer_ip(greeting: str) -> str:
    return greeting.split()[1]


def closed_port(ip: str) -> int:
    """A port nothing listens on at `ip`."""
    sock = socket.create_server((ip, 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


def settings(**overrides: object) -> DataPlaneSettings:
    base = DataPlaneSettings(ports=PortSettings(), upstream_mark=0x539, hbone=HboneSettings())
    return dataclasses.replace(base, **overrides)


# Tunnels between nodes


async def test_tunnel_carries_bytes_both_ways_and_half_close_with_the_client_ip() -> None:
    async with running_mesh() as mesh:
        echo = mesh.pods["echo"]
        greeting, echoed = await exchange(await mesh.connect(echo.address), b"hello over HBONE")
        assert peer_ip(greeting) == SLEEP_IP  # delivered from the client pod's own IP
        assert echoed == b"hello over HBONE"

        await eventually(lambda: mesh.b.count("istio_tcp_connections_closed_total") == 1)
        await eventually(lambda: mesh.a.count("istio_tcp_connections_closed_total") == 1)
        for node, reporter in ((mesh.a, "source"), (mesh.b, "destination")):
            labels = {
                "reporter": reporter,
                "source_principal": spiffe("sleep"),
                "destination_principal": spiffe("echo"),
                "destination_workload": "echo",
                "connection_security_policy": "mutual_tls",
            }
            assert node.count("istio_tcp_connections_opened_total", **labels) == 1
            assert node.count("istio_tcp_sent_bytes_total", **labels) == len(b"hello over HBONE")
            assert node.count("istio_tcp_received_bytes_total", **labels) == len(greeting) + 1 + len(echoed)
        [outbound] = mesh.a.access.lines
        [inbound] = mesh.b.access.lines
        assert (outbound["direction"], inbound["direction"]) == ("outbound", "inbound")
        assert outbound["dst.addr"] == inbound["dst.addr"] == str(echo.address)
        assert inbound["src.addr"].startswith(f"{SLEEP_IP}:")
        assert "error" not in outbound
        assert "error" not in inbound


async def test_large_transfer_arrives_intact_both_ways() -> None:
    payload = random.Random(4).randbytes(24 << 20)
    async with running_mesh() as mesh:
        reader, writer = await mesh.connect(mesh.pods["echo"].address)

        async def send() -> None:
            writer.write(payload)
            await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        await read_greeting(reader)
        async with asyncio.timeout(60):
            echoed = await reader.read()
        await sender
        writer.close()
        assert len(echoed) == len(payload)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


async def test_slow_client_slows_the_server_instead_of_buffering() -> None:
    firehose = Firehose(stall_s=0.2)

    server = await asyncio.start_server(firehose, ECHO_IP, 0)
    port = server.sockets[0].getsockname()[1]
    small_windows = HboneSettings(stream_window=256 * 1024, connection_window=1 << 20)
    async with running_mesh(hbone=small_windows) as mesh:
        _, writer = await mesh.connect(Address(ECHO_IP, port), limit=1024)
        writer.transport.pause_reading()
        await asyncio.sleep(1.0)
        firehose.stop.set()
        # Kernel buffers along the path hold some megabytes; without backpressure the agents would
        # read on and buffer without bound (hundreds of MB per second on loopback).
        assert firehose.produced < 64 << 20
        writer.transport.abort()
    server.close()


async def test_server_reset_reaches_the_client_as_a_reset() -> None:
    async def resetter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        writer.transport.abort()

    server = await asyncio.start_server(resetter, ECHO_IP, 0)
    async with running_mesh() as mesh:
        await expect_reset(await mesh.connect(Address(ECHO_IP, server.sockets[0].getsockname()[1])))
        await eventually(lambda: len(mesh.a.access.lines) == 1)
        assert "reset" in mesh.a.access.lines[0]["error"]
    server.close()


async def test_client_reset_reaches_the_server_as_a_reset() -> None:
    outcome: asyncio.Future[BaseException | bytes] = asyncio.get_running_loop().create_future()

    async def reader_of(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            outcome.set_result(await reader.read())
        except ConnectionResetError as error:
            outcome.set_result(error)
        writer.close()

    server = await asyncio.start_server(reader_of, ECHO_IP, 0)
    async with running_mesh() as mesh:
        _, writer = await mesh.connect(Address(ECHO_IP, server.sockets[0].getsockname()[1]))
        writer.write(b"about to vanish")
        await eventually(lambda: mesh.b.count("istio_tcp_sent_bytes_total") == 15)
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        writer.transport.abort()
        async with asyncio.timeout(WAIT_S):
            assert isinstance(await outcome, ConnectionResetError)
    server.close()


async def test_server_identity_other_than_the_destination_is_rejected_before_anything_is_sent() -> None:
    async with running_mesh(echo_served_as="impostor") as mesh:
        echo = mesh.pods["echo"]
        await expect_reset(await mesh.connect(echo.address))
        await eventually(lambda: mesh.a.count("istio_tcp_connections_failed_total", response_flags="UF") == 1)
        assert echo.accepted == 0
        assert mesh.b.count("istio_tcp_connections_opened_total") == 0
        assert mesh.b.plane.config_dump()["inbound_connections"] == []
        [line] = mesh.a.access.lines
        assert spiffe("impostor") in line["error"]


@pytest.mark.parametrize("client_certificate", ["trusted", "none", "untrusted", "no-alpn"])
async def test_hbone_port_refuses_clients_without_a_trusted_certificate_and_h2(
    client_certificate: str,
) -> None:
    async with running_mesh() as mesh:
        if client_certificate == "none":
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            context.check_hostname = False
            context.load_verify_locations(cadata=mesh.ca.bundle.to_pem().decode())
            context.set_alpn_protocols(["h2"])
        else:
            issuer = EphemeralCa.create() if client_certificate == "untrusted" else mesh.ca
            context = client_context(issuer.issue(spiffe("sleep")), mesh.ca.bundle)
            if client_certificate == "no-alpn":
                context.set_alpn_protocols(["http/1.1"])
        outcome: bytes | Exception
        try:
            reader, writer = await asyncio.open_connection(
                ECHO_IP, mesh.hbone_port, ssl=context, server_hostname=""
            )
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            async with asyncio.timeout(WAIT_S):
                outcome = await reader.read(65536)
            writer.close()
        except (ssl.SSLError, ConnectionError) as error:
            outcome = error
        assert mesh.pods["echo"].accepted == 0
        if client_certificate == "trusted":  # the control: this client is served HTTP/2
            assert isinstance(outcome, bytes)
            assert outcome[3:4] == b"\x04"  # the server's SETTINGS frame
            return
        assert outcome == b"" or isinstance(outcome, Exception)  # no HTTP/2 byte came back
        assert mesh.b.plane.config_dump()["inbound_connections"] == []
        # The listener is unharmed: the next tunnel goes through.
        _, echoed = await exchange(await mesh.connect(mesh.pods["echo"].address), b"next")
        assert echoed == b"next"


async def test_refused_upstream_resets_the_client() -> None:
    async with running_mesh() as mesh:
        await expect_reset(await mesh.connect(Address(ECHO_IP, closed_port(ECHO_IP))))
        await eventually(lambda: mesh.b.count("istio_tcp_connections_failed_total", response_flags="UF") == 1)
        await eventually(lambda: mesh.a.count("istio_tcp_connections_failed_total", response_flags="UF") == 1)
        assert "refused" in mesh.b.access.lines[0]["error"]
        assert "503" in mesh.a.access.lines[0]["error"]


async def test_a_connect_left_unanswered_resets_the_client_and_the_tunnel() -> None:
    async with running_mesh(connect_timeout_s=0.1) as mesh:
        requested: list[HboneStreamEnd] = []
        # Node-b takes the CONNECT and never answers it (its pod neither accepts nor refuses).
        mesh.b.plane.inbound._tunnel_requested = lambda driver, stream, request: requested.append(stream)  # type: ignore[method-assign]
        await expect_reset(await mesh.connect(mesh.pods["echo"].address))
        await eventually(lambda: mesh.a.count("istio_tcp_connections_failed_total", response_flags="UF") == 1)
        assert mesh.a.access.lines[0]["error"] == "no answer to the CONNECT within 0.2s"
        [stream] = requested
        await eventually(lambda: stream.gone)  # reset by node-a
        assert mesh.pods["echo"].accepted == 0


async def test_policy_denial_answers_401_and_resets_the_client() -> None:
    async with running_mesh(authorization_policies=[deny_from("sleep")]) as mesh:
        await expect_reset(await mesh.connect(mesh.pods["echo"].address))
        await eventually(
            lambda: mesh.a.count("istio_tcp_connections_failed_total", response_flags="UAEX") == 1
        )
        assert mesh.b.count("istio_tcp_connections_failed_total", response_flags="UAEX") == 1
        assert mesh.pods["echo"].accepted == 0
        assert "401" in mesh.a.access.lines[0]["error"]


async def test_policy_update_closes_open_connections_it_denies() -> None:
    async with running_mesh() as mesh:
        reader, writer = await mesh.connect(mesh.pods["echo"].address)
        writer.write(b"ping")
        await read_greeting(reader)
        assert await reader.readexactly(4) == b"ping"

        mesh.b.plane.update_snapshot(mesh.snapshot(2, authorization_policies=[deny_from("local")]))
        writer.write(b"still allowed")
        assert await reader.readexactly(13) == b"still allowed"

        mesh.b.plane.update_snapshot(mesh.snapshot(3, authorization_policies=[deny_from("sleep")]))
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(WAIT_S):
                await reader.read()
        writer.close()
        await eventually(
            lambda: any("closed by a policy update" in line.get("error", "") for line in mesh.b.access.lines)
        )


async def test_forwarded_client_ip_of_another_identity_is_not_spoofed() -> None:
    # Node-a believes the client pod runs as `local`, so it tunnels with that identity while the
    # forwarded header names the pod's IP, which node-b knows as `sleep`'s: node-b must neither
    # deliver from that IP nor report the connection as coming from that workload.
    async with running_mesh(client_identity_on_a="local") as mesh:
        greeting, echoed = await exchange(await mesh.connect(mesh.pods["echo"].address), b"trust me")
        assert echoed == b"trust me"
        assert peer_ip(greeting) != SLEEP_IP
        await eventually(lambda: mesh.b.count("istio_tcp_connections_closed_total") == 1)
        labels = {"source_principal": spiffe("local"), "source_workload": "unknown"}
        assert mesh.b.count("istio_tcp_connections_opened_total", **labels) == 1


# Same node, passthrough, plaintext


async def test_same_node_destination_is_delivered_in_process_with_both_reports() -> None:
    async with running_mesh() as mesh:
        greeting, echoed = await exchange(await mesh.connect(mesh.pods["local"].address), b"next door")
        assert peer_ip(greeting) == SLEEP_IP
        assert echoed == b"next door"
        await eventually(lambda: mesh.a.count("istio_tcp_connections_closed_total") == 2)
        for reporter in ("source", "destination"):
            assert (
                mesh.a.count(
                    "istio_tcp_sent_bytes_total",
                    reporter=reporter,
                    source_principal=spiffe("sleep"),
                    destination_principal=spiffe("local"),
                    connection_security_policy="mutual_tls",
                )
                == 9
            )
        assert sorted(line["direction"] for line in mesh.a.access.lines) == ["inbound", "outbound"]
        assert mesh.a.plane.config_dump()["outbound_pool"] == []


async def test_same_node_delivery_applies_the_destination_policy() -> None:
    async with running_mesh() as mesh:
        mesh.a.plane.update_snapshot(mesh.snapshot(2, authorization_policies=[deny_from("sleep")]))
        await expect_reset(await mesh.connect(mesh.pods["local"].address))
        await eventually(
            lambda: (
                mesh.a.count(
                    "istio_tcp_connections_failed_total", reporter="destination", response_flags="UAEX"
                )
                == 1
            )
        )
        assert mesh.pods["local"].accepted == 0


async def test_passthrough_to_a_pod_outside_the_mesh_keeps_the_client_ip_and_no_tunnel() -> None:
    async with running_mesh() as mesh:
        greeting, echoed = await exchange(await mesh.connect(mesh.pods["plain"].address), b"plain")
        assert peer_ip(greeting) == SLEEP_IP
        assert echoed == b"plain"
        assert mesh.a.plane.config_dump()["outbound_pool"] == []
        assert mesh.b.count("istio_tcp_connections_opened_total") == 0
        await eventually(
            lambda: (
                mesh.a.count(
                    "istio_tcp_connections_closed_total",
                    destination_workload="plain",
                    connection_security_policy="unknown",
                )
                == 1
            )
        )


@pytest.mark.parametrize(("name", "tunnelled"), [("echo", True), ("plain", False)])
async def test_service_address_is_load_balanced_to_an_endpoint(name: str, tunnelled: bool) -> None:
    async with running_mesh() as mesh:
        service_address = Address(SERVICE_IPS[name], SERVICE_PORT)
        greeting, echoed = await exchange(await mesh.connect(service_address), b"via service")
        assert echoed == b"via service"
        assert peer_ip(greeting) == SLEEP_IP
        await eventually(
            lambda: (
                mesh.a.count(
                    "istio_tcp_connections_closed_total",
                    destination_service_name=name,
                    destination_workload=name,
                )
                == 1
            )
        )
        assert mesh.b.count("istio_tcp_connections_opened_total") == (1 if tunnelled else 0)
        assert mesh.a.access.lines[0]["dst.addr"] == str(service_address)


async def test_unknown_source_is_refused() -> None:
    async with running_mesh() as mesh:
        await expect_reset(await mesh.connect(mesh.pods["echo"].address, source_ip=OUTSIDER_IP))
        assert mesh.pods["echo"].accepted == 0


async def test_plaintext_to_a_pod_is_delivered_with_the_client_ip_unless_mtls_is_strict() -> None:
    async with running_mesh() as mesh:
        echo = mesh.pods["echo"]
        greeting, echoed = await exchange(
            await mesh.plaintext_b.open(OUTSIDER_IP, echo.address), b"plaintext"
        )
        assert peer_ip(greeting) == OUTSIDER_IP
        assert echoed == b"plaintext"

        mesh.b.plane.update_snapshot(mesh.snapshot(2, peer_authentications=[strict_mtls()]))
        await expect_reset(await mesh.plaintext_b.open(OUTSIDER_IP, echo.address))
        await eventually(
            lambda: mesh.b.count("istio_tcp_connections_failed_total", response_flags="UAEX") == 1
        )
        assert echo.accepted == 1
        assert "STRICT" in mesh.b.access.lines[-1]["error"]


async def test_plaintext_to_an_address_that_is_no_local_pod_is_refused() -> None:
    async with running_mesh() as mesh:
        await expect_reset(await mesh.plaintext_b.open(OUTSIDER_IP, mesh.pods["plain"].address))
        assert mesh.pods["plain"].accepted == 0


# Pooling


async def test_pool_shares_a_connection_up_to_the_stream_limit_then_opens_another() -> None:
    async with running_mesh(hbone=HboneSettings(max_concurrent_streams=2)) as mesh:
        echo = mesh.pods["echo"]
        open_streams: list[Streams] = []
        for _ in range(2):
            streams = await mesh.connect(echo.address)
            await read_greeting(streams[0])
            open_streams.append(streams)
        [pooled] = mesh.a.plane.config_dump()["outbound_pool"]  # type: ignore[misc]
        assert pooled["connections"] == [2]

        streams = await mesh.connect(echo.address)
        await read_greeting(streams[0])
        open_streams.append(streams)
        [pooled] = mesh.a.plane.config_dump()["outbound_pool"]  # type: ignore[misc]
        assert pooled["connections"] == [2, 1]
        assert len(mesh.b.plane.config_dump()["inbound_connections"]) == 2  # type: ignore[arg-type]

        for streams in open_streams:
            assert await finish(streams, b"done") == b"done"


async def test_a_tunnel_the_server_refused_unprocessed_is_retried_on_another_connection() -> None:
    async with running_mesh() as mesh:
        echo = mesh.pods["echo"]
        assert await finish(await mesh.connect(echo.address), b"first") != b""  # a pooled connection
        [served] = mesh.b.plane.inbound.connections
        # Its GOAWAY is queued, not sent: the next CONNECT still takes this connection, is refused
        # with REFUSED_STREAM (never processed), and the client's bytes must reach the pod anyway.
        served.hbone.start_drain()
        greeting, echoed = await exchange(await mesh.connect(echo.address), b"second, retried")
        assert echoed == b"second, retried"
        assert peer_ip(greeting) == SLEEP_IP
        await eventually(lambda: served not in mesh.b.plane.inbound.connections)
        assert echo.accepted == 2
        await eventually(lambda: mesh.a.count("istio_tcp_connections_closed_total") == 2)
        assert mesh.a.count("istio_tcp_sent_bytes_total") == len(b"first") + len(b"second, retried")


async def test_two_hundred_concurrent_connections_complete() -> None:
    async with running_mesh() as mesh:
        echo = mesh.pods["echo"]

        async def one(number: int) -> bytes:
            _, echoed = await exchange(await mesh.connect(echo.address), b"%d" % number)
            return echoed

        results = await asyncio.gather(*(one(number) for number in range(200)))
        assert results == [b"%d" % number for number in range(200)]
        [pooled] = mesh.a.plane.config_dump()["outbound_pool"]  # type: ignore[misc]
        assert all(streams <= 100 for streams in pooled["connections"])
        await eventually(lambda: mesh.b.count("istio_tcp_connections_closed_total") == 200)


async def test_keepalive_pings_are_answered_and_idle_connections_released() -> None:
    async with running_mesh(keepalive_interval_s=0.2, pool_idle_timeout_s=0.5) as mesh:
        streams = await mesh.connect(mesh.pods["echo"].address)
        await read_greeting(streams[0])
        await asyncio.sleep(0.8)  # several keepalive rounds: an unanswered PING would end the tunnel
        assert await finish(streams, b"alive") == b"alive"
        await eventually(lambda: mesh.a.plane.config_dump()["outbound_pool"] == [])
        await eventually(lambda: mesh.b.plane.config_dump()["inbound_connections"] == [])


# Drain


async def test_drain_lets_open_connections_finish_and_refuses_new_ones() -> None:
    async with running_mesh(drain_deadline_s=WAIT_S) as mesh:
        echo = mesh.pods["echo"]
        reader, writer = await mesh.connect(echo.address)
        writer.write(b"one")
        await read_greeting(reader)
        assert await reader.readexactly(3) == b"one"

        drain = asyncio.create_task(mesh.b.plane.drain())

        async def hbone_port_refuses() -> bool:
            try:
                _, probe = await asyncio.open_connection(ECHO_IP, mesh.hbone_port)
            except ConnectionRefusedError:
                return True
            probe.close()
            return False

        await eventually(hbone_port_refuses)
        await expect_reset(await mesh.connect(echo.address))
        assert not drain.done()

        writer.write(b"two")
        writer.write_eof()
        async with asyncio.timeout(WAIT_S):
            assert await reader.read() == b"two"
        writer.close()
        async with asyncio.timeout(WAIT_S):
            await drain
        assert not mesh.b.plane.listening
        assert echo.accepted == 1
        # The data plane's last act reports what finished, without waiting for the report delay.
        assert mesh.b.count("istio_tcp_connections_closed_total") == 1
        assert [line["direction"] for line in mesh.b.access.lines] == ["inbound"]


async def test_drain_deadline_resets_connections_still_open() -> None:
    async with running_mesh(drain_deadline_s=0.2) as mesh:
        reader, writer = await mesh.connect(mesh.pods["echo"].address)
        await read_greeting(reader)
        async with asyncio.timeout(WAIT_S):
            await mesh.b.plane.drain()
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(WAIT_S):
                await reader.read()
        writer.close()


# Facade


async def test_config_dump_is_json_and_names_the_certificates_in_use() -> None:
    async with running_mesh() as mesh:
        await exchange(await mesh.connect(mesh.pods["echo"].address), b"x")
        dump = json.loads(json.dumps(mesh.b.plane.config_dump()))
        assert dump["node"] == "node-b"
        assert dump["listening"] is True
        assert [certificate["identity"] for certificate in dump["certificates"]] == [spiffe("echo")]
        assert {workload["name"] for workload in dump["snapshot"]["workloads"]} == {
            "sleep",
            "local",
            "echo",
            "plain",
        }
        assert dump["settings"]["upstream_mark"] == 0x539


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"connect_timeout_s": 0.0}, "connect_timeout_s"),
        ({"keepalive_interval_s": float("inf")}, "keepalive_interval_s"),
        ({"drain_deadline_s": -1.0}, "drain_deadline_s"),
        ({"upstream_mark": 0}, "upstream_mark"),
    ],
)
def test_invalid_settings_name_the_setting(overrides: dict[str, object], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        settings(**overrides)


def test_settings_defaults_are_valid() -> None:
    assert settings().drain_deadline_s == 20.0


def free_ports(count: int) -> list[int]:
    """Ports free on the wildcard addresses of both families, as the listeners bind them."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.create_server(("0.0.0.0", 0)) as probe:
            port = int(probe.getsockname()[1])
            try:
                socket.create_server(("::", port), family=socket.AF_INET6).close()
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def test_listeners_are_bound_per_kind_and_family() -> None:
    outbound, plaintext, hbone = free_ports(3)
    ports = PortSettings(outbound=outbound, inbound_plaintext=plaintext, inbound_hbone=hbone)
    listeners = bind_listeners(dataclasses.replace(settings(), ports=ports, listen_ipv6=True))
    try:
        bound = {
            (listener.kind, listener.sock.family, listener.sock.getsockname()[1]) for listener in listeners
        }
        assert bound == {
            (kind, family, port)
            for kind, port in [
                (ListenerKind.OUTBOUND, outbound),
                (ListenerKind.INBOUND_PLAINTEXT, plaintext),
                (ListenerKind.INBOUND_HBONE, hbone),
            ]
            for family in (socket.AF_INET, socket.AF_INET6)
        }
    finally:
        for listener in listeners:
            listener.sock.close()


def test_listener_binding_fails_whole_and_leaves_nothing_bound() -> None:
    outbound, plaintext = free_ports(2)
    taken = socket.create_server(("0.0.0.0", 0))  # no SO_REUSEPORT: nobody can share it
    try:
        ports = PortSettings(
            outbound=outbound, inbound_plaintext=plaintext, inbound_hbone=taken.getsockname()[1]
        )
        with pytest.raises(SocketSetupError):
            bind_listeners(dataclasses.replace(settings(), ports=ports))
        socket.create_server(("0.0.0.0", outbound)).close()  # released again
    finally:
        taken.close()
