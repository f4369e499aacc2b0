"""The harness kubelet: runs the pods bound to one node as processes in pod network namespaces.

Run inside the node's namespace: `python -m tests.e2e.cluster.kubelet --state-dir DIR --node NAME`.
It registers the Node (podCIDR, addresses, capacity, Ready), renews its Lease so the node lifecycle
controller keeps it Ready, and watches Pods with `spec.nodeName=<node>`. One `PodWorker` per pod
owns that pod's life: sandbox (network namespace, address), processes (the init containers in
order, each to completion, then the first container; command and args, images ignored but for the
entrypoints of `IMAGE_ENTRYPOINTS`), restarts by `restartPolicy`, status patches, and graceful
deletion (SIGTERM, grace period, SIGKILL, sandbox removal, then the final delete of the object).

`PodWorker._prepare` materialises the pod's volumes (tests/e2e/cluster/volumes.py) between the sandbox
and the process, which then runs in a private mount namespace with each volume at its mountPath.
A container's readiness probe (httpGet or tcpSocket, run from the node's namespace against the pod's
IP, which is the node's for hostNetwork pods) drives its Ready condition; without a probe a running
container is ready. Liveness and startup probes are not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import re
import shutil
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from tests.e2e.cluster import netns
from tests.e2e.cluster.kubeapi import MERGE_PATCH, ApiUnavailable, JsonObject, KubeApi
from tests.e2e.cluster.layout import (
    API_PORT,
    CONTROL_PLANE_IP,
    K8S_VERSION,
    REPO_ROOT,
    Layout,
    NodeLayout,
    venv_python,
)
from tests.e2e.cluster.podnet import PodNetwork, Sandbox
from tests.e2e.cluster.volumes import PodVolumes, VolumeError, mount_command

log = logging.getLogger("kubelet")

MAX_GRACE_SECONDS = 30
"""Cap on a pod's termination grace period, so a stuck pod cannot hold a test for minutes."""

MAX_BACKOFF_SECONDS = 10.0
LEASE_DURATION_SECONDS = 40
LEASE_RENEW_SECONDS = 10.0
NODE_CAPACITY = {"cpu": "2", "memory": "8Gi", "pods": "110", "ephemeral-storage": "20Gi"}

IMAGE_ENTRYPOINTS = {
    "ambient-agent": ["ambient-agent"],
    "registry.k8s.io/kubectl": ["kubectl"],
}
"""The harness runs no images: a container without a `command` runs its image's entrypoint, known here
for the images the project's manifests use (the product's, as its Dockerfile sets it, and kubectl's),
by repository without tag or digest. The programs come from the host (the venv, Debian's kubectl)."""

_ENV_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


PROBE_DEFAULTS = {"periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3}
"""Kubernetes' values for the probe fields a probe leaves out."""


class ContainerConfigError(ValueError):
    """The container asks for something this kubelet does not emulate (reported on the pod)."""


def expand_references(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined variables are replaced, `$$` is a literal `$`."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _ENV_REFERENCE.sub(replace, text)


def field_value(pod: JsonObject, sandbox: Sandbox, node: NodeLayout, path: str) -> str:
    """The downward-API value of `path` for this pod."""
    metadata, spec = pod["metadata"], pod["spec"]
    simple = {
        "metadata.name": metadata["name"],
        "metadata.namespace": metadata["namespace"],
        "metadata.uid": metadata["uid"],
        "spec.nodeName": node.name,
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": sandbox.ip,
        "status.podIPs": sandbox.ip,
        "status.hostIP": node.ip,
    }
    if path in simple:
        return str(simple[path])
    keyed = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if keyed:
        return str(metadata.get(keyed.group(1), {}).get(keyed.group(2), ""))
    raise ContainerConfigError(f"fieldRef {path!r} is not supported by the harness kubelet")


def container_environment(
    pod: JsonObject, container: JsonObject, sandbox: Sandbox, node: NodeLayout
) -> dict[str, str]:
    """The process environment: a minimal base, in-cluster API coordinates, then the container's env."""
    venv_bin = str(Path(venv_python()).parent)
    env = {
        "PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "HOSTNAME": node.name if sandbox.netns is None else pod["metadata"]["name"],
        "KUBERNETES_SERVICE_HOST": str(CONTROL_PLANE_IP),
        "KUBERNETES_SERVICE_PORT": str(API_PORT),
    }
    for item in container.get("env") or []:
        name = item["name"]
        if "valueFrom" in item:
            field_ref = item["valueFrom"].get("fieldRef")
            if field_ref is None:
                raise ContainerConfigError(f"env {name}: only value and fieldRef are supported")
            env[name] = field_value(pod, sandbox, node, field_ref["fieldPath"])
        else:
            env[name] = expand_references(item.get("value", ""), env)
    return env


def image_repository(image: str) -> str:
    """`image` without its tag or digest."""
    name = image.split("@", 1)[0]
    last_slash = name.rfind("/")
    tag_colon = name.rfind(":")
    return name[:tag_colon] if tag_colon > last_slash else name


def container_argv(container: JsonObject, env: dict[str, str]) -> list[str]:
    """command (or the image's entrypoint) + args with `$(VAR)` expanded; `python`/`python3` become the
    project's interpreter."""
    command = container.get("command") or IMAGE_ENTRYPOINTS.get(image_repository(container.get("image", "")))
    if not command:
        raise ContainerConfigError(
            f"container {container['name']!r}: the harness runs no images, and knows no entrypoint for "
            f"{container.get('image')!r}: give it a command"
        )
    argv = [expand_references(a, env) for a in [*command, *(container.get("args") or [])]]
    if argv[0] in ("python", "python3"):
        argv[0] = venv_python()
    return argv


def probe_port(container: JsonObject, port: int | str) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or port.isdigit():
        return int(port)
    for declared in container.get("ports") or []:
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise ContainerConfigError(f"probe port {port!r} names no container port")


async def probe_once(probe: JsonObject, container: JsonObject, pod_ip: str) -> bool:
    """One readiness check: an HTTP GET answered with 2xx/3xx, or a TCP connect that succeeds."""
    timeout = float(probe.get("timeoutSeconds", PROBE_DEFAULTS["timeoutSeconds"]))
    if "httpGet" in probe:
        action = probe["httpGet"]
        host = action.get("host") or pod_ip
        port = probe_port(container, action["port"])
        request = f"GET {action.get('path', '/')} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode()
    else:
        action = probe["tcpSocket"]
        host = action.get("host") or pod_ip
        port = probe_port(container, action["port"])
        request = b""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                if not request:
                    return True
                writer.write(request)
                status_line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False
    parts = status_line.split()
    return len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400


def readiness_probe(container: JsonObject) -> JsonObject | None:
    """The container's readiness probe, None without one; refuses probe kinds this kubelet cannot run."""
    probe: JsonObject | None = container.get("readinessProbe")
    if probe is None:
        return None
    action = probe.get("httpGet") or probe.get("tcpSocket")
    if action is None:
        raise ContainerConfigError(f"readinessProbe {sorted(probe)}: only httpGet and tcpSocket are run")
    probe_port(container, action["port"])
    return probe


def pod_status(
    pod: JsonObject,
    sandbox: Sandbox,
    node: NodeLayout,
    *,
    phase: str,
    container_state: JsonObject,
    ready: bool,
    restarts: int,
    last_state: JsonObject | None = None,
    pid: int | None = None,
    init_statuses: list[JsonObject] | None = None,
) -> JsonObject:
    """The whole `status` this kubelet reports for a pod (conditions and container statuses included);
    `init_statuses` while its init containers run (the pod is not Initialized yet)."""
    timestamp = now()
    initialized = init_statuses is None

    def condition(kind: str, value: bool) -> JsonObject:
        return {"type": kind, "status": "True" if value else "False", "lastTransitionTime": timestamp}

    main = container_status(
        pod["spec"]["containers"][0], container_state, ready, restarts, last_state=last_state, pid=pid
    )
    return {
        "phase": phase,
        "hostIP": node.ip,
        "podIP": sandbox.ip,
        "podIPs": [{"ip": sandbox.ip}],
        "startTime": pod.get("status", {}).get("startTime") or timestamp,
        "conditions": [
            condition("Initialized", initialized),
            condition("Ready", ready),
            condition("ContainersReady", ready),
            condition("PodScheduled", True),
        ],
        "containerStatuses": [main],
        **({} if init_statuses is None else {"initContainerStatuses": init_statuses}),
    }


def container_status(
    container: JsonObject,
    state: JsonObject,
    ready: bool,
    restarts: int,
    *,
    last_state: JsonObject | None = None,
    pid: int | None = None,
) -> JsonObject:
    status: JsonObject = {
        "name": container["name"],
        "image": container.get("image") or "none",
        "imageID": "",
        "ready": ready,
        "started": "running" in state,
        "restartCount": restarts,
        "state": state,
        "lastState": last_state or {},
    }
    if pid is not None:
        status["containerID"] = f"harness://{pid}"
    return status


def terminated_state(exit_code: int, started_at: str) -> JsonObject:
    return {
        "terminated": {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": started_at,
            "finishedAt": now(),
        }
    }


class PodWorker:
    """Owns one pod from its first sighting until its object is deleted."""

    def __init__(self, kubelet: Kubelet, pod: JsonObject) -> None:
        self._kubelet = kubelet
        self.pod = pod
        self._changed = asyncio.Event()
        self._object_gone = False
        self._process: asyncio.subprocess.Process | None = None
        self._background: set[asyncio.Task[None]] = set()
        """The volume refresher and the readiness prober (cancelled when the pod goes)."""

    @property
    def uid(self) -> str:
        return str(self.pod["metadata"]["uid"])

    @property
    def _key(self) -> str:
        return f"{self.pod['metadata']['namespace']}/{self.pod['metadata']['name']}"

    @property
    def deleting(self) -> bool:
        return self._object_gone or bool(self.pod["metadata"].get("deletionTimestamp"))

    def update(self, pod: JsonObject) -> None:
        self.pod = pod
        self._changed.set()

    def object_deleted(self) -> None:
        """The object is gone from the API (force-deleted): tear down without the final delete."""
        self._object_gone = True
        self._changed.set()

    async def run(self) -> None:
        sandbox: Sandbox | None = None
        try:
            sandbox = await self._create_sandbox()
            await self._run_container(sandbox)
        except Exception as error:
            log.exception("%s: pod worker failed", self._key)
            await self._report_failure(error)
            await self._wait_for_deletion(None)
        finally:
            for task in self._background:
                task.cancel()
            await self._stop_process()
            await asyncio.to_thread(shutil.rmtree, self._volume_root, True)
            if sandbox is not None:
                await asyncio.to_thread(self._kubelet.network.detach, sandbox)
            if not self._object_gone:
                await self._kubelet.delete_pod_object(self.pod)
            self._kubelet.forget(self.uid)
            log.info("%s: removed", self._key)

    async def _create_sandbox(self) -> Sandbox:
        if self.pod["spec"].get("hostNetwork"):
            return self._kubelet.network.host_sandbox()
        meta = self.pod["metadata"]
        return await asyncio.to_thread(
            self._kubelet.network.attach, meta["namespace"], meta["name"], self.uid
        )

    @property
    def _volume_root(self) -> Path:
        return self._kubelet.layout.state_dir / "volumes" / self.uid

    def _start_background(self, coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine, name=f"{self._key} {name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _prepare(self, sandbox: Sandbox) -> list[tuple[list[str], dict[str, str]]]:
        """What the processes need before they start: the volumes in place, then each container's argv
        and environment, init containers first and the main container last."""
        node = self._kubelet.node
        readiness_probe(self.pod["spec"]["containers"][0])
        volumes = PodVolumes(
            self._kubelet.api,
            self.pod,
            self._volume_root,
            lambda path: field_value(self.pod, sandbox, node, path),
        )
        commands = []
        try:
            await volumes.materialise()
            for container in [
                *(self.pod["spec"].get("initContainers") or []),
                self.pod["spec"]["containers"][0],
            ]:
                env = container_environment(self.pod, container, sandbox, node)
                argv = container_argv(container, env)
                commands.append((mount_command(volumes.mounts(container), argv), env))
        except VolumeError as error:
            raise ContainerConfigError(str(error)) from error
        self._start_background(volumes.refresh_forever(), "volumes")
        return commands

    async def _probe_readiness(self, probe: JsonObject, status: dict[str, Any]) -> None:
        """Runs the readiness probe for one container run, re-patching the status when Ready flips."""
        container = self.pod["spec"]["containers"][0]
        settings = {**PROBE_DEFAULTS, **probe}
        successes = failures = 0
        await asyncio.sleep(float(probe.get("initialDelaySeconds", 0)))
        while True:
            if await probe_once(probe, container, status["sandbox"].ip):
                successes, failures = successes + 1, 0
            else:
                successes, failures = 0, failures + 1
            flip_to = None
            if not status["ready"] and successes >= int(settings["successThreshold"]):
                flip_to = True
            elif status["ready"] and failures >= int(settings["failureThreshold"]):
                flip_to = False
            if flip_to is not None:
                status["ready"] = flip_to
                log.info("%s: readiness %s", self._key, "passed" if flip_to else "failed")
                try:
                    await self._patch_status(pod_status(self.pod, **status))
                except ApiUnavailable as error:
                    # As a kubelet does, keep probing through an API outage; the flip is reported
                    # by a later round.
                    log.warning("%s: readiness not reported: %s", self._key, error)
                    status["ready"] = not flip_to
            await asyncio.sleep(float(settings["periodSeconds"]))

    async def _run_container(self, sandbox: Sandbox) -> None:
        node = self._kubelet.node
        try:
            *init_commands, (argv, env) = await self._prepare(sandbox)
        except ContainerConfigError as error:
            waiting = {"waiting": {"reason": "CreateContainerConfigError", "message": str(error)}}
            await self._patch_status(
                pod_status(
                    self.pod, sandbox, node, phase="Pending", container_state=waiting, ready=False, restarts=0
                )
            )
            await self._wait_for_deletion(None)
            return
        log_path = self._kubelet.layout.pod_log(
            self.pod["metadata"]["namespace"], self.pod["metadata"]["name"]
        )
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_bytes(b"")
        policy = self.pod["spec"].get("restartPolicy", "Always")
        if not await self._initialise(sandbox, init_commands, log_path, policy):
            return
        restarts = 0
        last_state: JsonObject | None = None
        while not self.deleting:
            pid = await self._spawn(sandbox, argv, env, log_path)
            running = {"running": {"startedAt": now()}}
            probe = readiness_probe(self.pod["spec"]["containers"][0])
            status: dict[str, Any] = {
                "sandbox": sandbox,
                "node": node,
                "phase": "Running",
                "container_state": running,
                "ready": probe is None,
                "restarts": restarts,
                "last_state": last_state,
                "pid": pid,
            }
            await self._patch_status(pod_status(self.pod, **status))
            prober = (
                None
                if probe is None
                else self._start_background(self._probe_readiness(probe, status), "probe")
            )
            exit_code = await self._wait_for_exit_or_deletion()
            if prober is not None:
                prober.cancel()
            if exit_code is None:
                return
            self._process = None
            log.info("%s: pid %d exited with %d", self._key, pid, exit_code)
            terminated = terminated_state(exit_code, running["running"]["startedAt"])
            if policy == "Never" or (policy == "OnFailure" and exit_code == 0):
                phase = "Succeeded" if exit_code == 0 else "Failed"
                await self._patch_status(
                    pod_status(
                        self.pod,
                        sandbox,
                        node,
                        phase=phase,
                        container_state=terminated,
                        ready=False,
                        restarts=restarts,
                    )
                )
                await self._wait_for_deletion(None)
                return
            restarts += 1
            last_state = terminated
            backoff = min(MAX_BACKOFF_SECONDS, 2.0 ** (restarts - 1))
            waiting = {"waiting": {"reason": "CrashLoopBackOff", "message": f"back-off {backoff:.0f}s"}}
            await self._patch_status(
                pod_status(
                    self.pod,
                    sandbox,
                    node,
                    phase="Running",
                    container_state=waiting,
                    ready=False,
                    restarts=restarts,
                    last_state=last_state,
                )
            )
            await self._wait_for_deletion(backoff)

    async def _spawn(self, sandbox: Sandbox, argv: list[str], env: dict[str, str], log_path: Path) -> int:
        """Starts a container's process (its output appended to the pod's log); its pid."""
        with log_path.open("ab") as log_file:
            self._process = await asyncio.create_subprocess_exec(
                *netns.enter(sandbox.netns, argv),
                env=env,
                cwd=REPO_ROOT,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        pid = self._process.pid
        log.info("%s: started pid %d in %s ip %s: %s", self._key, pid, sandbox.netns, sandbox.ip, argv)
        return pid

    async def _initialise(
        self,
        sandbox: Sandbox,
        commands: list[tuple[list[str], dict[str, str]]],
        log_path: Path,
        policy: str,
    ) -> bool:
        """Runs the init containers in order, each to completion, a failed one again after a back-off
        (restartPolicy Never: the pod fails). False when the pod ended first (deleted or failed)."""
        node = self._kubelet.node
        containers = self.pod["spec"].get("initContainers") or []
        initializing = {"waiting": {"reason": "PodInitializing"}}
        statuses = [container_status(container, initializing, False, 0) for container in containers]

        async def report(phase: str) -> None:
            await self._patch_status(
                pod_status(
                    self.pod,
                    sandbox,
                    node,
                    phase=phase,
                    container_state=initializing,
                    ready=False,
                    restarts=0,
                    init_statuses=statuses,
                )
            )

        for index, (container, (argv, env)) in enumerate(zip(containers, commands, strict=True)):
            restarts = 0
            while not self.deleting:
                pid = await self._spawn(sandbox, argv, env, log_path)
                started_at = now()
                statuses[index] = container_status(
                    container, {"running": {"startedAt": started_at}}, False, restarts, pid=pid
                )
                await report("Pending")
                exit_code = await self._wait_for_exit_or_deletion()
                if exit_code is None:
                    return False
                self._process = None
                log.info(
                    "%s: init container %s (pid %d) exited with %d",
                    self._key,
                    container["name"],
                    pid,
                    exit_code,
                )
                statuses[index] = container_status(
                    container, terminated_state(exit_code, started_at), exit_code == 0, restarts
                )
                if exit_code == 0:
                    break
                if policy == "Never":
                    await report("Failed")
                    await self._wait_for_deletion(None)
                    return False
                restarts += 1
                await report("Pending")
                await self._wait_for_deletion(min(MAX_BACKOFF_SECONDS, 2.0 ** (restarts - 1)))
        return not self.deleting

    async def _wait_for_deletion(self, timeout: float | None) -> None:
        """Returns when the pod is being deleted, or after `timeout` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not self.deleting:
                    await self._changed.wait()
                    self._changed.clear()

    async def _wait_for_exit_or_deletion(self) -> int | None:
        """The process's exit code, or None when deletion began first."""
        assert self._process is not None
        exited = asyncio.ensure_future(self._process.wait())
        deletion = asyncio.ensure_future(self._wait_for_deletion(None))
        await asyncio.wait([exited, deletion], return_when=asyncio.FIRST_COMPLETED)
        deletion.cancel()
        if exited.done() and not self.deleting:
            return exited.result()
        exited.cancel()
        return None

    async def _stop_process(self) -> None:
        """SIGTERM to the process group, the grace period, then SIGKILL."""
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        metadata, spec = self.pod["metadata"], self.pod["spec"]
        grace = metadata.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds", 30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=min(float(grace), MAX_GRACE_SECONDS))
        except TimeoutError:
            log.info("%s: pid %d ignored SIGTERM for %ss, killing", self._key, process.pid, grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()

    async def _report_failure(self, error: Exception) -> None:
        """Puts the reason on the pod, so a test waiting for it shows why instead of timing out mutely."""
        with contextlib.suppress(ApiUnavailable):
            await self._patch_status({"reason": "HarnessKubeletError", "message": f"{error!r}"})

    async def _patch_status(self, status: JsonObject) -> None:
        meta = self.pod["metadata"]
        response = await self._kubelet.api.request(
            "PATCH",
            f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
            body={"status": status},
            content_type=MERGE_PATCH,
        )
        if not response.ok and response.status != 404:
            log.warning("%s: status patch failed: %s %s", self._key, response.status, response.body)


class Kubelet:
    """Registers the node, keeps it Ready, and runs a `PodWorker` per pod bound to it."""

    def __init__(self, layout: Layout, node: NodeLayout, api: KubeApi) -> None:
        self.layout = layout
        self.node = node
        self.api = api
        self.network = PodNetwork(layout, node)
        self._workers: dict[str, PodWorker] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        await self._register_node()
        heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
        try:
            await self._sync_pods()
        finally:
            heartbeat.cancel()

    def forget(self, uid: str) -> None:
        self._workers.pop(uid, None)

    async def delete_pod_object(self, pod: JsonObject) -> None:
        meta = pod["metadata"]
        response = await self.api.request(
            "DELETE",
            f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
            body={"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
        )
        if not response.ok and response.status not in (404, 409):
            log.warning("%s/%s: final delete failed: %s", meta["namespace"], meta["name"], response.body)

    async def _register_node(self) -> None:
        """Creates the Node with a Ready status (so it is never tainted not-ready), or refreshes it."""
        node = self.node
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": node.name,
                "labels": {
                    "kubernetes.io/hostname": node.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
            "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]},
            "status": self._node_status(),
        }
        while True:
            try:
                response = await self.api.request("POST", "/api/v1/nodes", body=body)
                if response.status == 409:
                    response = await self.api.request(
                        "PATCH",
                        f"/api/v1/nodes/{node.name}/status",
                        body={"status": self._node_status()},
                        content_type=MERGE_PATCH,
                    )
                if response.ok:
                    break
                log.warning("node registration: %s %s", response.status, response.body)
            except ApiUnavailable:
                pass
            await asyncio.sleep(0.2)
        log.info("registered node %s (%s, pods %s)", node.name, node.ip, node.pod_cidr)

    def _node_status(self) -> JsonObject:
        timestamp = now()

        def condition(kind: str, status: str, reason: str) -> JsonObject:
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "lastHeartbeatTime": timestamp,
                "lastTransitionTime": timestamp,
            }

        return {
            "capacity": NODE_CAPACITY,
            "allocatable": NODE_CAPACITY,
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID"),
                condition("Ready", "True", "KubeletReady"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": self.node.ip},
                {"type": "Hostname", "address": self.node.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": os.uname().release,
                "osImage": "ambient-agent e2e harness",
                "containerRuntimeVersion": "harness://0",
                "kubeletVersion": K8S_VERSION,
                "kubeProxyVersion": K8S_VERSION,
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    async def _heartbeat(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node.name}"
        lease: JsonObject = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.node.name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": self.node.name, "leaseDurationSeconds": LEASE_DURATION_SECONDS},
        }
        while True:
            try:
                renew = {"spec": {"renewTime": now_micro()}}
                response = await self.api.request("PATCH", path, body=renew, content_type=MERGE_PATCH)
                if response.status == 404:
                    lease["spec"].update(renew["spec"])
                    response = await self.api.request("POST", path.rsplit("/", 1)[0], body=lease)
                if not response.ok:
                    log.warning("lease renewal failed: %s %s", response.status, response.body)
                # The node lifecycle controller marks the node Unknown (and taints it) when the lease
                # lapsed, e.g. over an API server outage; only the kubelet's own status report undoes that.
                response = await self.api.request(
                    "PATCH",
                    f"/api/v1/nodes/{self.node.name}/status",
                    body={"status": self._node_status()},
                    content_type=MERGE_PATCH,
                )
                if not response.ok:
                    log.warning("node status report failed: %s %s", response.status, response.body)
            except ApiUnavailable as error:
                log.warning("lease renewal failed: %s", error)
            await asyncio.sleep(LEASE_RENEW_SECONDS)

    async def _sync_pods(self) -> None:
        """LIST then WATCH this node's pods forever; relists after a watch error (e.g. 410 Gone)."""
        params = {"fieldSelector": f"spec.nodeName={self.node.name}"}
        while True:
            try:
                listing = await self.api.request("GET", "/api/v1/pods", params=params)
                if not listing.ok:
                    raise ApiUnavailable(f"list pods: {listing.status} {listing.body}")
                present = set()
                for pod in listing.body.get("items", []):
                    present.add(pod["metadata"]["uid"])
                    self._observe(pod)
                for uid, worker in list(self._workers.items()):
                    if uid not in present:
                        worker.object_deleted()
                version = listing.body["metadata"]["resourceVersion"]
                while version:
                    version = await self._watch_from(params, version)
            except ApiUnavailable as error:
                log.warning("pod sync: %s; relisting", error)
                await asyncio.sleep(0.5)

    async def _watch_from(self, params: dict[str, str], version: str) -> str:
        """Processes watch events; the version to resume from, or "" when a relist is needed."""
        query = {**params, "resourceVersion": version, "allowWatchBookmarks": "true", "timeoutSeconds": "300"}
        async for event in self.api.watch("/api/v1/pods", query):
            kind, obj = event["type"], event["object"]
            if kind == "ERROR":
                log.info("watch error %s; relisting", obj.get("code"))
                return ""
            version = obj["metadata"]["resourceVersion"]
            if kind == "BOOKMARK":
                continue
            if kind == "DELETED":
                worker = self._workers.get(obj["metadata"]["uid"])
                if worker is not None:
                    worker.update(obj)
                    worker.object_deleted()
            else:
                self._observe(obj)
        return version

    def _observe(self, pod: JsonObject) -> None:
        uid = pod["metadata"]["uid"]
        worker = self._workers.get(uid)
        if worker is not None:
            worker.update(pod)
            return
        if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            return
        if pod["metadata"].get("deletionTimestamp"):
            # Never started here (e.g. deleted before this kubelet saw it): only the object is left.
            task = asyncio.create_task(self.delete_pod_object(pod))
        else:
            worker = PodWorker(self, pod)
            self._workers[uid] = worker
            task = asyncio.create_task(worker.run(), name=f"pod {uid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _node_from_state(state_dir: Path, node_name: str) -> tuple[Layout, NodeLayout]:
    state: dict[str, Any] = json.loads((state_dir / "cluster.json").read_text())
    layout = Layout(prefix=state["prefix"], state_dir=state_dir, node_count=state["node_count"])
    for node in layout.nodes:
        if node.name == node_name:
            return layout, node
    raise SystemExit(f"kubelet: no node {node_name!r} in {state_dir}")


async def _main(state_dir: Path, node_name: str) -> None:
    layout, node = _node_from_state(state_dir, node_name)
    pki = layout.pki_dir
    api = KubeApi(
        f"https://{CONTROL_PLANE_IP}:{API_PORT}", pki / "ca.crt", pki / "admin.crt", pki / "admin.key"
    )
    try:
        await Kubelet(layout, node, api).run()
    finally:
        await api.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the e2e harness kubelet for one node")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--node", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format=f"%(asctime)s {args.node} %(levelname)s %(message)s"
    )
    asyncio.run(_main(args.state_dir, args.node))


if __name__ == "__main__":
    main()
