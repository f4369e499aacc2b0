"""Keeps the node's capture state equal to the desired one for the enrolled local pods.

`RedirectReconciler` is the synchronous core: a full pass reads the installed state through the
adapters, plans the difference and applies it (so a second pass changes nothing); a pod update
changes only set elements, without reading, while the installed elements are known. `ReconcileLoop`
drives it from asyncio on one worker thread: after every change of the enrolled pods, and every
`drift_check_interval` seconds as a full pass that repairs whatever was deleted behind the agent's
back; failures are retried with exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from agent.redirect.errors import NftError, RedirectError
from agent.redirect.plan import InstalledRedirect, Plan, plan, plan_pods
from agent.redirect.ruleset import (
    DesiredRedirect,
    LocalRoute,
    NftCommand,
    PodIp,
    PolicyRule,
    build,
    element_commands,
    parse_table_listing,
    replace_table_commands,
)
from agent.retry import Backoff
from agent.settings import PortSettings, RedirectSettings

log = logging.getLogger(__name__)


class NftablesPort(Protocol):
    """What the reconciler needs from nftables (`agent.redirect.nft.Nftables`)."""

    def apply(self, commands: Sequence[NftCommand]) -> None: ...

    def list_table(self, table: str) -> Mapping[str, Any] | None: ...


class RoutingPort(Protocol):
    """What the reconciler needs from policy routing (`agent.redirect.routing.PolicyRouting`)."""

    def rules(self, family: int, table: int, fwmark: int, fwmask: int) -> frozenset[PolicyRule]: ...

    def add_rule(self, rule: PolicyRule) -> None: ...

    def delete_rule(self, rule: PolicyRule) -> None: ...

    def local_routes(self, family: int, table: int) -> frozenset[LocalRoute]: ...

    def add_route(self, route: LocalRoute) -> None: ...

    def delete_route(self, route: LocalRoute) -> None: ...


class SysctlPort(Protocol):
    """What the reconciler needs from `/proc/sys` (`agent.redirect.sysctl.Sysctls`)."""

    def read(self, name: str) -> str | None: ...

    def write(self, name: str, value: str) -> None: ...

    def ipv6_available(self) -> bool: ...


class RedirectReconciler:
    """Brings the node's table, rules, routes and sysctls to the desired state. One caller at a time."""

    def __init__(
        self,
        settings: RedirectSettings,
        ports: PortSettings,
        nftables: NftablesPort,
        routing: RoutingPort,
        sysctls: SysctlPort,
    ) -> None:
        self._settings = settings
        self._ports = ports
        self._nftables = nftables
        self._routing = routing
        self._sysctls = sysctls
        self._installed_pods: frozenset[PodIp] | None = None

    def reconcile(self, pods: frozenset[PodIp]) -> Plan:
        """A full pass: reads everything, applies the difference, returns it (empty when none)."""
        self._installed_pods = None
        desired = self._desired(pods)
        change = plan(desired, self._read(desired))
        self._apply(desired, change)
        self._installed_pods = desired.pod_ips
        return change

    def update_pods(self, pods: frozenset[PodIp]) -> Plan:
        """Changes only set elements when the installed ones are known, else runs a full pass.

        A failed element update (the table was changed behind the agent's back) also falls back
        to a full pass.
        """
        if self._installed_pods is None:
            return self.reconcile(pods)
        desired = self._desired(pods)
        change = plan_pods(desired.pod_ips, self._installed_pods)
        try:
            self._apply(desired, change)
        except NftError as error:
            log.warning("set update failed, reconciling the whole table: %s", error)
            return self.reconcile(pods)
        self._installed_pods = desired.pod_ips
        return change

    def _desired(self, pods: frozenset[PodIp]) -> DesiredRedirect:
        return build(self._settings, self._ports, pods, ipv6=self._sysctls.ipv6_available())

    def _read(self, desired: DesiredRedirect) -> InstalledRedirect:
        s = self._settings
        families = {r.family for r in desired.local_routes}
        listing = self._nftables.list_table(s.table_name)
        return InstalledRedirect(
            table=None if listing is None else parse_table_listing(listing, s.table_name),
            policy_rules=frozenset().union(
                *(self._routing.rules(f, s.route_table, s.capture_mark, s.capture_mask) for f in families)
            ),
            local_routes=frozenset().union(*(self._routing.local_routes(f, s.route_table) for f in families)),
            sysctls={v.name: self._sysctls.read(v.name) for v in desired.sysctls},
        )

    def _apply(self, desired: DesiredRedirect, change: Plan) -> None:
        for setting in change.write_sysctls:
            log.warning(
                "setting %s=%s (was %s): otherwise %s",
                setting.name,
                setting.value,
                self._sysctls.read(setting.name),
                setting.reason,
            )
            self._sysctls.write(setting.name, setting.value)
        # Routing first, so that no packet is marked before marked packets have somewhere to go.
        for route in sorted(change.add_routes):
            self._routing.add_route(route)
        for rule in sorted(change.add_rules):
            self._routing.add_rule(rule)
        if change.replace_table:
            self._nftables.apply(replace_table_commands(desired))
        elif change.add_pods or change.remove_pods:
            self._nftables.apply(
                element_commands(desired.table, add=change.add_pods, remove=change.remove_pods)
            )
        for rule in sorted(change.remove_rules):
            self._routing.delete_rule(rule)


@dataclass(frozen=True)
class RedirectStatus:
    """How the loop is doing, for readiness and logs."""

    synced_pods: frozenset[PodIp] | None
    """The enrolled pods the node's capture state last matched; None before the first success."""

    consecutive_failures: int
    """Failed passes since the last success."""

    last_error: str | None
    """The most recent failure, or None after a success."""


class ReconcileLoop:
    """Runs a `RedirectReconciler` from asyncio: on pod changes, on a drift timer, with backoff."""

    def __init__(
        self,
        reconciler: RedirectReconciler,
        settings: RedirectSettings,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        backoff: Backoff | None = None,
        on_failure: Callable[[RedirectError], None] | None = None,
    ) -> None:
        self._reconciler = reconciler
        self._on_failure = on_failure
        self._settings = settings
        self._sleep = sleep
        self._backoff = backoff or Backoff(
            base_s=settings.retry_initial_delay, cap_s=settings.retry_max_delay
        )
        self._pods: frozenset[PodIp] = frozenset()
        self._changed = asyncio.Event()
        self._status = RedirectStatus(synced_pods=None, consecutive_failures=0, last_error=None)

    @property
    def status(self) -> RedirectStatus:
        """The outcome of the most recent pass."""
        return self._status

    def enrol(self, pods: frozenset[PodIp]) -> None:
        """Makes `pods` the enrolled local pods; the loop applies the change as soon as it can."""
        self._pods = pods
        self._changed.set()

    async def run(self) -> None:
        """Reconciles until cancelled. Kernel calls block, so they run on the loop's own thread."""
        loop = asyncio.get_running_loop()
        interval = self._settings.drift_check_interval
        full_pass_due = loop.time()
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="redirect")
        try:
            while True:
                self._changed.clear()
                pods = self._pods
                full_pass = loop.time() >= full_pass_due
                step = self._reconciler.reconcile if full_pass else self._reconciler.update_pods
                try:
                    change = await loop.run_in_executor(worker, step, pods)
                except RedirectError as error:
                    await self._after_failure(error)
                    full_pass_due = loop.time()
                    continue
                if full_pass:
                    full_pass_due = loop.time() + interval
                self._status = RedirectStatus(synced_pods=pods, consecutive_failures=0, last_error=None)
                for line in change.describe(self._settings.table_name):
                    log.info("redirect: %s", line)
                # Pod changes wake the loop early; they never postpone the next full pass.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), max(0.0, full_pass_due - loop.time()))
        finally:
            # Without waiting: a kernel call in flight finishes on its own, the loop is not blocked.
            worker.shutdown(wait=False)

    async def _after_failure(self, error: RedirectError) -> None:
        if self._on_failure is not None:
            self._on_failure(error)
        failures = self._status.consecutive_failures + 1
        self._status = RedirectStatus(self._status.synced_pods, failures, str(error))
        delay = self._backoff.delay(failures - 1)
        log.warning("redirect reconcile failed (%d in a row), retrying in %.1fs: %s", failures, delay, error)
        await self._sleep(delay)
