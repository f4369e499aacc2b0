"""`ambient-agent ca`: the workload CA process.

On start it loads its root from the Secret, or creates and stores one (`ca_store`), and publishes the
trust bundle ConfigMap; then kopf watches CertificateSigningRequests and hands each of this signer's
(`ambient-agent.dev/spiffe`) to `CsrSigner`, while a loop keeps re-asserting the bundle ConfigMap.

kopf runs standalone (no peering) with `@kopf.on.event`, which writes nothing on the CSRs beyond the
CA's own answers. Several replicas may run: they share one root (see `ca_store`), and when they race
on a CSR the loser's write conflicts and it finds the CSR answered (see `ca_signer`), so the only
cost is duplicate work. A new root in the Secret (a rotation) takes effect on restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from datetime import UTC, datetime
from typing import Any

import kopf
from cryptography.hazmat.primitives import hashes

from agent.identity.ca import CertificateAuthority
from agent.identity.certificates import TrustBundle
from agent.operator.ca_decision import SIGNER_NAME
from agent.operator.ca_settings import CaSettings
from agent.operator.ca_signer import CsrSigner
from agent.operator.ca_store import CaStoreError, load_or_create_root, publish_bundle, published_bundle
from agent.operator.kopf_login import register_login
from agent.operator.kubeapi import ApiAccess, ApiAccessError, load_api_access
from agent.operator.rest import ApiClient, ApiUnreachable
from agent.retry import Backoff

log = logging.getLogger(__name__)

EXIT_FAILED = 1
"""Exit status when the CA cannot start: no API access, or an unusable root in its Secret."""


def _now() -> datetime:
    return datetime.now(UTC)


async def _start(api: ApiClient, settings: CaSettings) -> tuple[CertificateAuthority, TrustBundle]:
    """Loads or creates the root and publishes the bundle, retrying while the API server is unreachable."""
    backoff = Backoff(base_s=1.0, cap_s=30.0)
    attempt = 0
    while True:
        try:
            authority, secret = await load_or_create_root(
                api, settings.namespace, settings.secret_name, settings.signing.trust_domain, _now()
            )
            bundle = published_bundle(secret, authority, _now())
            await publish_bundle(api, bundle, settings.namespace, settings.bundle_configmap)
        except ApiUnreachable as error:
            delay = backoff.delay(attempt)
            attempt += 1
            log.warning("API server unreachable (%s); retrying in %.1fs", error, delay)
            await asyncio.sleep(delay)
            continue
        fingerprint = authority.certificate.fingerprint(hashes.SHA256()).hex()
        log.info("CA root sha256:%s, valid until %s", fingerprint, authority.certificate.not_valid_after_utc)
        return authority, bundle


async def _keep_bundle_published(api: ApiClient, bundle: TrustBundle, settings: CaSettings) -> None:
    """Restores the bundle ConfigMap whenever it was deleted or edited."""
    while True:
        await asyncio.sleep(settings.bundle_check_interval)
        try:
            if await publish_bundle(api, bundle, settings.namespace, settings.bundle_configmap):
                log.warning("the trust bundle ConfigMap had been changed or deleted; restored it")
        except (ApiUnreachable, CaStoreError) as error:
            log.warning("could not check the trust bundle ConfigMap: %s", error)


def _registry(signer: CsrSigner, access: ApiAccess) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    register_login(registry, access)

    @kopf.on.event(
        "certificates.k8s.io",
        "v1",
        "certificatesigningrequests",
        field="spec.signerName",
        value=SIGNER_NAME,
        registry=registry,
    )
    async def csr_event(event: kopf.RawEvent, **_: Any) -> None:
        if event.get("type") != "DELETED":
            await signer.handle(copy.deepcopy(dict(event["object"])))

    return registry


def _operator_settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    # The CA posts its own Events (one per decision); kopf's would repeat its log lines on the CSRs.
    settings.posting.enabled = False
    settings.peering.standalone = True
    # CSRs are built in: no need to watch CRDs for new resources (nor the RBAC to list them).
    settings.scanning.disabled = True
    return settings


async def serve(settings: CaSettings, *, stop: asyncio.Event | None = None) -> int:
    """Runs the CA until `stop` is set or a signal stops kopf; the process exit status."""
    try:
        access = load_api_access(settings.kubeconfig)
    except ApiAccessError as error:
        log.error("%s", error)
        return EXIT_FAILED
    async with ApiClient(access) as api:
        try:
            authority, bundle = await _start(api, settings)
        except CaStoreError as error:
            log.error("cannot start the CA: %s", error)
            return EXIT_FAILED
        signer = CsrSigner(
            api,
            authority,
            settings.signing,
            event_namespace=settings.event_namespace,
            instance=settings.instance,
            now=_now,
        )
        keeper = asyncio.create_task(_keep_bundle_published(api, bundle, settings), name="ca: bundle keeper")
        try:
            await kopf.operator(
                registry=_registry(signer, access),
                settings=_operator_settings(),
                standalone=True,
                clusterwide=True,
                stop_flag=stop,
            )
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
    return 0


def run_ca(settings: CaSettings) -> int:
    """The `ambient-agent ca` command: serves until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(settings))
