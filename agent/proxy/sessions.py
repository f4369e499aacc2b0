"""The data plane's live connections: their metrics, access-log lines, policy re-checks and drain.

Every relayed connection is a session with one or two legs: the source's view (reporter `source`,
an `outbound` log line) and/or the destination's (reporter `destination`, `inbound`). A cross-node
tunnel has one leg on each node; a same-node tunnel has both legs in this process. Refusals count
as failed connections with a response flag and get a log line too. Inbound sessions remember what
they were authorized as, so a snapshot with new policies can close those it now denies.

A connection is reported (closed or failed counters, its access-log line with the duration at its
end) a moment later, in order with the others that ended meanwhile (`REPORT_DELAY_S`): a connection
ends while the next one from the same client is being set up (its FIN and END_STREAMs cross that
connection's CONNECT), and the report, the largest part of a connection's teardown, would otherwise
run on that connection's path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import assert_never

from agent.observability.accesslog import AccessLog, AccessRecord, Direction
from agent.observability.metrics import AgentMetrics, TcpLabels, TrackedConnection
from agent.proxy.labels import ResponseFlag, failed_labels
from agent.proxy.relay import Relay, RelayOutcome
from agent.state import Deny, InboundConnection, Snapshot, Workload, authorize

log = logging.getLogger(__name__)

REPORT_DELAY_S = 0.02
"""How long a finished connection's report waits at most (see the module docstring). A batch costs a
timer, a pass and one access-log write whatever its size; at a new connection per millisecond, 20 ms
takes most of that off each connection, and the counters and log lines trail by 20 ms at most."""


@dataclass(frozen=True, slots=True)
class Leg:
    """One side's report of a connection."""

    direction: Direction
    labels: TcpLabels
    source_address: str
    """The client's `ip:port`."""
    destination_address: str
    """The `ip:port` the client asked for."""


@dataclass(frozen=True, slots=True)
class InboundAuthorization:
    """What an inbound connection was authorized as, to re-check against later snapshots."""

    destination: Workload
    connection: InboundConnection


@dataclass(frozen=True, slots=True)
class _Finished:
    """A relayed connection that ended, to report."""

    session: Session
    outcome: RelayOutcome
    ended_at: float


@dataclass(frozen=True, slots=True)
class _Refused:
    """A connection that could not be opened, to report."""

    legs: Sequence[Leg]
    flag: ResponseFlag
    error: str
    duration_s: float


@dataclass(eq=False)
class Session:
    """One live relayed connection."""

    legs: Sequence[Leg]
    tracked: Sequence[TrackedConnection]
    authorization: InboundAuthorization | None
    relay: Relay | None = None


class Sessions:
    """The live sessions of one data plane."""

    def __init__(self, metrics: AgentMetrics, access_log: AccessLog) -> None:
        self._metrics = metrics
        self._access_log = access_log
        self._live: set[Session] = set()
        self._idle: asyncio.Event | None = None
        self._unreported: list[_Finished | _Refused] = []
        """Connections that ended, in order, waiting for `report_pending`."""
        self._report_timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._live)

    def begin(self, legs: Sequence[Leg], authorization: InboundAuthorization | None = None) -> Relay:
        """Counts a connection as opened and returns the relay to join its two ends with."""
        tracked = [self._metrics.tcp.opened(leg.labels) for leg in legs]
        session = Session(legs, tracked, authorization)
        relay = Relay(lambda outcome: self._finished(session, outcome), *tracked)
        session.relay = relay
        self._live.add(session)
        return relay

    def refused(self, legs: Sequence[Leg], flag: ResponseFlag, error: str, accepted_at: float) -> None:
        """Counts a connection that could not be opened, and logs why."""
        self._report_later(_Refused(legs, flag, error, max(0.0, time.monotonic() - accepted_at)))

    def recheck(self, snapshot: Snapshot) -> int:
        """Closes the inbound sessions that `snapshot`'s policies deny; returns how many."""
        closed = 0
        for session in list(self._live):
            authorization = session.authorization
            if authorization is None or session.relay is None:
                continue
            destination = (
                snapshot.workload(authorization.connection.destination_ip) or authorization.destination
            )
            decision = authorize(snapshot, destination, authorization.connection)
            if isinstance(decision, Deny):
                session.relay.fail(f"closed by a policy update: {decision}")
                closed += 1
        return closed

    def fail_all(self, reason: str) -> None:
        """Aborts every live session (both ends reset)."""
        for session in list(self._live):
            if session.relay is not None:
                session.relay.fail(reason)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Waits up to `timeout_s` for every session to end; True if none is left."""
        if not self._live:
            return True
        self._idle = asyncio.Event()
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return not self._live
        finally:
            self._idle = None
        return True

    def report_pending(self) -> None:
        """Reports the connections that ended and were not reported yet (the data plane's last act
        calls it)."""
        if self._report_timer is not None:
            self._report_timer.cancel()
            self._report_timer = None
        unreported, self._unreported = self._unreported, []
        records: list[AccessRecord] = []
        for report in unreported:
            match report:
                case _Finished():
                    records += self._report_finished(report)
                case _Refused():
                    records += self._report_refused(report)
                case _:
                    assert_never(report)
        self._access_log.write_all(records)

    def _finished(self, session: Session, outcome: RelayOutcome) -> None:
        self._live.discard(session)
        self._report_later(_Finished(session, outcome, time.monotonic()))
        if not self._live and self._idle is not None:
            self._idle.set()

    def _report_later(self, report: _Finished | _Refused) -> None:
        self._unreported.append(report)
        if self._report_timer is None:
            loop = asyncio.get_running_loop()
            self._report_timer = loop.call_later(REPORT_DELAY_S, self.report_pending)

    def _report_finished(self, report: _Finished) -> list[AccessRecord]:
        """Counts a finished connection's legs as closed; their access records."""
        session = report.session
        records = []
        for leg, tracked in zip(session.legs, session.tracked, strict=True):
            self._metrics.tcp.closed(tracked)
            records.append(
                AccessRecord.of(
                    tracked,
                    leg.direction,
                    leg.source_address,
                    leg.destination_address,
                    error=report.outcome.error,
                    now=report.ended_at,
                )
            )
        return records

    def _report_refused(self, report: _Refused) -> list[AccessRecord]:
        """Counts a refused connection's legs as failed; their access records."""
        records = []
        for leg in report.legs:
            labels = failed_labels(leg.labels, report.flag)
            self._metrics.tcp.failed(labels)
            records.append(
                AccessRecord(
                    direction=leg.direction,
                    source_address=leg.source_address,
                    destination_address=leg.destination_address,
                    source=labels.source,
                    destination=labels.destination,
                    bytes_sent=0,
                    bytes_received=0,
                    duration_s=report.duration_s,
                    error=report.error,
                )
            )
        return records
