"""The node's certificate manager: one workload certificate per service account hosted on this node.

For every wanted identity (a service account with an enrolled pod on this node, from the control
plane's `set_wanted`) it makes a fresh ECDSA key in memory, asks the CA through a `CertificateIssuer`,
and renews at half life with a fresh key; a failed renewal is retried with backoff while the old
certificate stays in use until it expires. Identities no longer wanted are dropped with their keys.

The data plane asks `credential()`: a valid certificate, or after a short wait a typed failure saying
why (never a plaintext fallback). The issuer is injected: `agent.operator.csr_client` speaks the
Kubernetes CSR API in production; tests use an in-process issuer built on `sign_leaf`.

Pure asyncio: the manager lives on one event loop; other threads reach it with
`loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from agent.identity.certificates import CertificateError, TrustBundle, WorkloadCertificate
from agent.identity.csr import build_csr, generate_key
from agent.identity.rotation import renewal_retry_delay, renewal_time, time_until_renewal
from agent.identity.spiffe import SpiffeId
from agent.retry import Backoff

log = logging.getLogger(__name__)


# What the CA answers.


@dataclass(frozen=True)
class Issued:
    """The CA signed the request."""

    chain_pem: bytes
    """The issued chain as PEM, leaf first."""


@dataclass(frozen=True)
class IssueDenied:
    """The CA refused the request."""

    reason: str
    """The CA's own sentence saying why."""


@dataclass(frozen=True)
class IssueFailed:
    """No answer: the CA or the API server was unreachable, too slow, or refused our request."""

    reason: str
    """What went wrong, for logs and for the data plane's failure message."""


IssueOutcome = Issued | IssueDenied | IssueFailed


class CertificateIssuer(Protocol):
    """The CA as the node sees it."""

    async def issue(self, spiffe_id: SpiffeId, csr_pem: bytes, *, timeout: float) -> IssueOutcome:
        """Submits a PEM CSR for `spiffe_id` and waits up to `timeout` seconds for the CA's answer.

        Never raises for an expected failure: those are `IssueFailed`. Cleans up what it created.
        """
        ...

    def trust_bundles(self) -> AsyncIterator[TrustBundle]:
        """The current trust bundle as soon as known, then each new one; runs until cancelled."""
        ...


class Clock(Protocol):
    """Wall-clock time (certificate validity) and sleeping by it."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Returns after `seconds` have passed on this clock."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        """`datetime.now(UTC)`."""
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        """`asyncio.sleep`."""
        await asyncio.sleep(seconds)


ExpiryObserver = Callable[[SpiffeId, datetime | None], None]
"""Told the expiry of the certificate now in use for an identity, or None once it is dropped
(e.g. to set `AgentMetrics.certificate_expiry`)."""

FailureObserver = Callable[[SpiffeId, str], None]
"""Told each failed attempt to obtain a certificate for an identity, and why (e.g. to count it in
`AgentMetrics.reconcile_errors`)."""


# What the data plane gets when there is no certificate to use.


@dataclass(frozen=True)
class NotHosted:
    """The identity is not wanted on this node: no enrolled local pod runs as that service account."""

    spiffe_id: SpiffeId
    """The identity asked for."""

    @property
    def reason(self) -> str:
        """One sentence for logs and connection errors."""
        return f"{self.spiffe_id} is not hosted on this node (no enrolled local pod has that service account)"


@dataclass(frozen=True)
class NotReady:
    """The identity is wanted, but no valid certificate arrived within the wait."""

    spiffe_id: SpiffeId
    """The identity asked for."""

    reason: str
    """Why not: no certificate yet or the last one expired, and the last failure seen."""


CredentialFailure = NotHosted | NotReady


@dataclass(frozen=True)
class BundleUnavailable:
    """No trust bundle has been read yet."""

    reason: str
    """One sentence for logs and connection errors."""


@dataclass(frozen=True)
class IdentityStatus:
    """Where one identity stands, for the admin endpoint and tests."""

    not_after: datetime | None
    """Expiry of the certificate in use; None before the first one."""

    renewal_due: datetime | None
    """When the certificate in use is (or was) due for renewal."""

    failures: int
    """Failed attempts since the last success."""

    last_error: str | None
    """The most recent failure, kept after a success for diagnosis."""


@dataclass
class _Identity:
    spiffe_id: SpiffeId
    certificate: WorkloadCertificate | None = None
    failures: int = 0
    last_error: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def announce(self) -> None:
        """Wakes everyone waiting for a change; later waiters wait on a fresh event."""
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class CertificateManager:
    """Keeps a valid certificate for each wanted identity; use as `async with`."""

    def __init__(
        self,
        issuer: CertificateIssuer,
        *,
        issue_timeout: float = 30.0,
        backoff: Backoff | None = None,
        clock: Clock | None = None,
        on_expiry: ExpiryObserver | None = None,
        on_failure: FailureObserver | None = None,
    ) -> None:
        self._issuer = issuer
        self._issue_timeout = issue_timeout
        self._backoff = backoff or Backoff(base_s=1.0, cap_s=300.0)
        self._clock = clock or SystemClock()
        self._on_expiry = on_expiry
        self._on_failure = on_failure
        self._identities: dict[SpiffeId, _Identity] = {}
        # Cancelled renewals of dropped identities, kept until they finish cleaning up (their CSRs).
        self._dropping: set[asyncio.Task[None]] = set()
        self._bundle: TrustBundle | None = None
        self._bundle_changed = asyncio.Event()
        self._bundle_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> CertificateManager:
        self._bundle_task = asyncio.create_task(self._follow_trust_bundle(), name="identity: trust bundle")
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stops every renewal and the bundle watch, and forgets every key."""
        self.set_wanted(())
        if self._bundle_task is not None:
            self._bundle_task.cancel()
        for task in [*self._dropping, self._bundle_task]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._bundle_task = None

    # -- control plane -----------------------------------------------------------------------------

    def set_wanted(self, identities: Iterable[SpiffeId]) -> None:
        """Makes the set of identities held exactly `identities`: new ones are requested at once,
        missing ones are dropped with their keys and certificates."""
        wanted = frozenset(identities)
        for spiffe_id in [s for s in self._identities if s not in wanted]:
            state = self._identities.pop(spiffe_id)
            if state.task is not None:
                state.task.cancel()
                self._dropping.add(state.task)
                state.task.add_done_callback(self._dropping.discard)
            state.certificate = None
            state.announce()
            self._observe(spiffe_id, None)
            log.info("dropped identity %s: no longer hosted on this node", spiffe_id)
        for spiffe_id in wanted - self._identities.keys():
            state = _Identity(spiffe_id)
            state.task = asyncio.create_task(self._maintain(state), name=f"identity: {spiffe_id}")
            self._identities[spiffe_id] = state

    # -- data plane --------------------------------------------------------------------------------

    async def credential(
        self, spiffe_id: SpiffeId, timeout: float
    ) -> WorkloadCertificate | CredentialFailure:
        """The valid certificate for `spiffe_id`, waiting up to `timeout` seconds for one to arrive."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            state = self._identities.get(spiffe_id)
            if state is None:
                return NotHosted(spiffe_id)
            if (certificate := self._usable(state)) is not None:
                return certificate
            changed = state.changed
            remaining = deadline - loop.time()
            if remaining <= 0:
                return NotReady(spiffe_id, self._unready_reason(state, timeout))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()

    async def trust_bundle(self, timeout: float) -> TrustBundle | BundleUnavailable:
        """The current trust bundle, waiting up to `timeout` seconds for the first one."""
        if self._bundle is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._bundle_changed.wait()
        if self._bundle is None:
            return BundleUnavailable(f"no trust bundle has been read from the CA yet (waited {timeout:g}s)")
        return self._bundle

    def status(self) -> Mapping[SpiffeId, IdentityStatus]:
        """Every wanted identity's state."""
        statuses = {}
        for spiffe_id, state in self._identities.items():
            certificate = state.certificate
            statuses[spiffe_id] = IdentityStatus(
                not_after=certificate.not_after if certificate else None,
                renewal_due=renewal_time(certificate.not_before, certificate.not_after)
                if certificate
                else None,
                failures=state.failures,
                last_error=state.last_error,
            )
        return statuses

    # -- internals ---------------------------------------------------------------------------------

    def _usable(self, state: _Identity) -> WorkloadCertificate | None:
        certificate = state.certificate
        if certificate is not None and self._clock.now() < certificate.not_after:
            return certificate
        return None

    def _unready_reason(self, state: _Identity, timeout: float) -> str:
        if state.certificate is not None:
            reason = (
                f"the certificate for {state.spiffe_id} expired at {state.certificate.not_after.isoformat()}"
            )
        else:
            reason = f"no certificate for {state.spiffe_id} has been issued yet (waited {timeout:g}s)"
        if state.last_error:
            reason += f"; last attempt: {state.last_error}"
        return reason

    def _observe(self, spiffe_id: SpiffeId, not_after: datetime | None) -> None:
        if self._on_expiry is not None:
            self._on_expiry(spiffe_id, not_after)

    async def _maintain(self, state: _Identity) -> None:
        """Requests, renews at half life, retries with backoff; runs until the identity is dropped."""
        while True:
            current = state.certificate
            if current is not None:
                due = time_until_renewal(current.not_before, current.not_after, self._clock.now())
                await self._clock.sleep(due.total_seconds())
            outcome = await self._request(state.spiffe_id)
            if isinstance(outcome, WorkloadCertificate):
                state.certificate = outcome
                state.failures = 0
                state.announce()
                self._observe(state.spiffe_id, outcome.not_after)
                log.info("certificate for %s issued, valid until %s", state.spiffe_id, outcome.not_after)
                continue
            delay = renewal_retry_delay(
                self._backoff,
                state.failures,
                not_after=current.not_after if current else None,
                now=self._clock.now(),
            )
            state.failures += 1
            state.last_error = outcome
            state.announce()
            if self._on_failure is not None:
                self._on_failure(state.spiffe_id, outcome)
            log.warning(
                "certificate for %s not obtained (attempt %d): %s; retrying in %.1fs",
                state.spiffe_id,
                state.failures,
                outcome,
                delay,
            )
            await self._clock.sleep(delay)

    async def _request(self, spiffe_id: SpiffeId) -> WorkloadCertificate | str:
        """One attempt with a fresh key: the certificate, or why there is none."""
        key = generate_key()
        try:
            outcome = await self._issuer.issue(
                spiffe_id, build_csr(key, spiffe_id), timeout=self._issue_timeout
            )
        except Exception as error:  # an issuer bug must not end this identity's renewals
            log.exception("certificate issuer failed for %s", spiffe_id)
            return f"the issuer raised {type(error).__name__}: {error}"
        if isinstance(outcome, IssueDenied):
            return f"the CA denied the request: {outcome.reason}"
        if isinstance(outcome, IssueFailed):
            return outcome.reason
        try:
            certificate = WorkloadCertificate.from_pem(outcome.chain_pem, key)
        except CertificateError as error:
            return f"the CA's answer is unusable: {error}"
        if certificate.spiffe_id != spiffe_id:
            return f"the CA issued a certificate for {certificate.spiffe_id}, not {spiffe_id}"
        if certificate.not_after <= self._clock.now():
            return f"the CA issued a certificate that expired at {certificate.not_after.isoformat()}"
        return certificate

    async def _follow_trust_bundle(self) -> None:
        attempt = 0
        while True:
            try:
                async for bundle in self._issuer.trust_bundles():
                    attempt = 0
                    self._bundle = bundle
                    self._bundle_changed.set()
                    log.info("trust bundle updated: %d root(s)", len(bundle.roots))
                reason = "the trust bundle stream ended"
            except Exception as error:  # an issuer bug must not leave the node on a stale bundle
                log.exception("trust bundle stream failed")
                reason = f"the trust bundle stream raised {type(error).__name__}: {error}"
            delay = self._backoff.delay(attempt)
            attempt += 1
            log.warning("%s; following it again in %.1fs", reason, delay)
            await self._clock.sleep(delay)
