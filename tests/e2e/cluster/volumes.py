"""Pod volumes for the harness kubelet: their files on the host and their mounts in the pod's mount namespace.

`PodVolumes` writes each volume of a pod into its own directory under the pod's volume root:
ConfigMap and Secret volumes (a file per key, or the listed items), downward-API volumes, projected
volumes (service-account tokens from the TokenRequest API bound to the pod, with the projection's
audience and expiry, plus ConfigMap, Secret and downward-API sources), emptyDir (an empty directory)
and hostPath (the host path itself). `refresh_forever` rewrites them periodically, which both rotates
tokens long before they expire and propagates ConfigMap and Secret changes; files are replaced
atomically, so a reader never sees half a token.

`mount_command` wraps a container's argv: in a new private mount namespace it bind-mounts each
volume at its mountPath, then execs the argv (same pid, so signals and the exit status are the
container's). Pods share the host's filesystem (there are no images), so a mount target missing on the
host is created there as an empty directory or file: choose mountPaths accordingly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.cluster.kubeapi import JsonObject, KubeApi
from tests.e2e.cluster.layout import REPO_ROOT

REFRESH_SECONDS = 60.0
"""How often volumes are rewritten; tokens live at least 600 s (the API's minimum), so this rotates them
long before expiry."""

SOURCE_WAIT_SECONDS = 60.0
"""How long a pod waits for a ConfigMap or Secret it needs (e.g. `kube-root-ca.crt` of a new namespace)."""

DEFAULT_TOKEN_SECONDS = 3607


class VolumeError(ValueError):
    """A volume this kubelet cannot provide (unsupported kind, or a missing required object)."""


@dataclass(frozen=True)
class Mount:
    """One bind mount in the pod's mount namespace."""

    source: Path
    target: str
    read_only: bool


def mount_command(mounts: list[Mount], argv: list[str]) -> list[str]:
    """argv run in a private mount namespace where `mounts` are in place.

    The image is ignored, so pods run the project's own code and interpreter from the host: a
    volume mounted over an ancestor of those (an emptyDir at /tmp while the checkout lives in /tmp,
    as on CI) would hide them. They are opened before the volumes are mounted and bound back at
    their own paths afterwards (`--no-canonicalize`, so the /proc/self/fd link is not resolved to
    the now-hidden path).
    """
    steps = ["set -e"]
    targets = [Path(mount.target) for mount in mounts]
    hidden = [
        keep
        for keep in _host_paths_pods_need()
        if any(keep == target or target in keep.parents for target in targets)
    ]
    for fd, keep in enumerate(hidden, start=_FIRST_KEEP_FD):
        steps.append(f"exec {fd}<{shlex.quote(str(keep))}")
    for mount in mounts:
        source, target = shlex.quote(str(mount.source)), shlex.quote(mount.target)
        if mount.source.is_dir():
            steps.append(f"mkdir -p {target}")
        else:
            steps.append(f'mkdir -p "$(dirname {target})"; [ -e {target} ] || touch {target}')
        steps.append(f"mount --bind {source} {target}")
        if mount.read_only:
            steps.append(f"mount -o remount,bind,ro {target}")
    for fd, keep in enumerate(hidden, start=_FIRST_KEEP_FD):
        path = shlex.quote(str(keep))
        steps.append(
            f"mkdir -p {path}; mount --no-canonicalize --bind /proc/self/fd/{fd} {path}; exec {fd}<&-"
        )
    steps.append('exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(steps), "sh", *argv]


_FIRST_KEEP_FD = 3


def _host_paths_pods_need() -> list[Path]:
    """The checkout (code and venv) and the interpreter's installation, which pod commands run from."""
    return [REPO_ROOT, Path(sys.base_prefix).resolve()]


class PodVolumes:
    """The volumes of one pod, kept up to date under `root` while the pod lives."""

    def __init__(self, api: KubeApi, pod: JsonObject, root: Path, field: Callable[[str], str]) -> None:
        self._api = api
        self._pod = pod
        self._root = root
        self._field = field
        """The downward-API value of a field path for this pod."""

    @property
    def _namespace(self) -> str:
        return str(self._pod["metadata"]["namespace"])

    async def materialise(self) -> None:
        """Writes every volume, waiting a while for the objects they need."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SOURCE_WAIT_SECONDS
        while True:
            try:
                await self.write_all()
                return
            except _ObjectMissing as missing:
                if loop.time() > deadline:
                    raise VolumeError(str(missing)) from None
                await asyncio.sleep(1.0)

    def mounts(self, container: JsonObject) -> list[Mount]:
        """Where `container`'s volumeMounts come from."""
        by_name = {volume["name"]: volume for volume in self._pod["spec"].get("volumes") or []}
        mounts = []
        for mount in container.get("volumeMounts") or []:
            volume = by_name.get(mount["name"])
            if volume is None:
                raise VolumeError(f"volumeMount {mount['name']!r} names no volume of the pod")
            source = self._source(volume)
            if mount.get("subPath"):
                source = source / mount["subPath"]
            mounts.append(Mount(source, mount["mountPath"], bool(mount.get("readOnly"))))
        return mounts

    async def refresh_forever(self) -> None:
        """Rewrites the volumes every REFRESH_SECONDS (token rotation, ConfigMap/Secret updates)."""
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            # A deleted ConfigMap or Secret leaves the last files in place, as the kubelet does.
            with contextlib.suppress(_ObjectMissing):
                await self.write_all()

    async def write_all(self) -> None:
        for volume in self._pod["spec"].get("volumes") or []:
            files = await self._files(volume)
            if files is not None:
                _write_files(self._root / volume["name"], files)
            elif "emptyDir" in volume:
                (self._root / volume["name"]).mkdir(parents=True, exist_ok=True)
            elif "hostPath" in volume:
                if volume["hostPath"].get("type") == "DirectoryOrCreate":
                    Path(volume["hostPath"]["path"]).mkdir(parents=True, exist_ok=True)
            else:
                kinds = sorted(set(volume) - {"name"})
                raise VolumeError(
                    f"volume {volume['name']!r}: {kinds} is not supported by the harness kubelet"
                )

    def _source(self, volume: JsonObject) -> Path:
        if "hostPath" in volume:
            return Path(str(volume["hostPath"]["path"]))
        return self._root / str(volume["name"])

    async def _files(self, volume: JsonObject) -> dict[str, tuple[bytes, int]] | None:
        """path -> (content, mode) of a file-backed volume; None for emptyDir and hostPath."""
        if "configMap" in volume:
            return await self._config_map(volume["configMap"], volume["configMap"].get("defaultMode", 0o644))
        if "secret" in volume:
            return await self._secret(volume["secret"], volume["secret"].get("defaultMode", 0o644))
        if "downwardAPI" in volume:
            return self._downward(volume["downwardAPI"], volume["downwardAPI"].get("defaultMode", 0o644))
        if "projected" in volume:
            mode = volume["projected"].get("defaultMode", 0o644)
            files: dict[str, tuple[bytes, int]] = {}
            for source in volume["projected"].get("sources") or []:
                if "serviceAccountToken" in source:
                    projection = source["serviceAccountToken"]
                    files[projection["path"]] = (await self._token(projection), mode)
                elif "configMap" in source:
                    files.update(await self._config_map(source["configMap"], mode))
                elif "secret" in source:
                    files.update(await self._secret(source["secret"], mode))
                elif "downwardAPI" in source:
                    files.update(self._downward(source["downwardAPI"], mode))
                else:
                    raise VolumeError(f"projected source {sorted(source)} is not supported")
            return files
        return None

    async def _config_map(self, ref: JsonObject, mode: int) -> dict[str, tuple[bytes, int]]:
        data = await self._object_data("configmaps", ref["name"], bool(ref.get("optional")))
        encoded = {key: value.encode() for key, value in (data.get("data") or {}).items()}
        binary = {key: base64.b64decode(value) for key, value in (data.get("binaryData") or {}).items()}
        return _select({**encoded, **binary}, ref, mode)

    async def _secret(self, ref: JsonObject, mode: int) -> dict[str, tuple[bytes, int]]:
        name = ref.get("secretName") or ref["name"]
        data = await self._object_data("secrets", name, bool(ref.get("optional")))
        return _select(
            {key: base64.b64decode(value) for key, value in (data.get("data") or {}).items()}, ref, mode
        )

    def _downward(self, spec: JsonObject, mode: int) -> dict[str, tuple[bytes, int]]:
        files = {}
        for item in spec.get("items") or []:
            if "fieldRef" not in item:
                raise VolumeError(f"downwardAPI item {item['path']!r}: only fieldRef is supported")
            files[item["path"]] = (
                self._field(item["fieldRef"]["fieldPath"]).encode(),
                item.get("mode", mode),
            )
        return files

    async def _object_data(self, resource: str, name: str, optional: bool) -> JsonObject:
        response = await self._api.request("GET", f"/api/v1/namespaces/{self._namespace}/{resource}/{name}")
        if response.status == 404:
            if optional:
                return {}
            raise _ObjectMissing(f"{resource[:-1]} {self._namespace}/{name} not found")
        if not response.ok:
            raise _ObjectMissing(
                f"{resource[:-1]} {self._namespace}/{name}: {response.status} {response.body}"
            )
        body: JsonObject = response.body
        return body

    async def _token(self, projection: JsonObject) -> bytes:
        """A token for the pod's service account, bound to the pod (TokenRequest)."""
        metadata, spec = self._pod["metadata"], self._pod["spec"]
        account = spec.get("serviceAccountName") or "default"
        audience = projection.get("audience")
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [audience] if audience else [],
                "expirationSeconds": projection.get("expirationSeconds", DEFAULT_TOKEN_SECONDS),
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": metadata["name"],
                    "uid": metadata["uid"],
                },
            },
        }
        response = await self._api.request(
            "POST", f"/api/v1/namespaces/{self._namespace}/serviceaccounts/{account}/token", body=request
        )
        if not response.ok:
            raise _ObjectMissing(f"token for {self._namespace}/{account}: {response.status} {response.body}")
        return str(response.body["status"]["token"]).encode()


class _ObjectMissing(Exception):
    """An object a volume needs is not there (yet)."""


def _select(data: dict[str, bytes], ref: JsonObject, mode: int) -> dict[str, tuple[bytes, int]]:
    """The files of a ConfigMap/Secret source: every key, or only its `items` at their paths."""
    items = ref.get("items")
    if not items:
        return {key: (value, mode) for key, value in data.items()}
    selected = {}
    for item in items:
        if item["key"] in data:
            selected[item["path"]] = (data[item["key"]], item.get("mode", mode))
        elif not ref.get("optional"):
            raise _ObjectMissing(
                f"key {item['key']!r} not found in {ref.get('name') or ref.get('secretName')}"
            )
    return selected


def _write_files(directory: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """Makes `directory` hold exactly `files`, each replaced atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    for relative, (content, mode) in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_bytes(content)
        staging.chmod(mode)
        os.replace(staging, path)
    wanted = {directory / relative for relative in files}
    for path in directory.rglob("*"):
        if path.is_file() and path not in wanted:
            path.unlink()
