"""Network namespaces and the processes inside them: create, enter, list, empty and delete.

Processes enter a namespace with `nsenter --net` rather than `ip netns exec`: the latter also
unshares the mount namespace, and a kubelet running that way would create pod namespaces
(bind mounts under /run/netns) that nobody outside it can see.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")


class CommandError(RuntimeError):
    """A command the harness ran failed; the message holds the command and its stderr."""


def run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Runs a short command, raising `CommandError` with its stderr when `check` and it fails."""
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise CommandError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def ip(netns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs `ip` in `netns` (None: the current namespace)."""
    prefix = ["ip", "-n", netns] if netns else ["ip"]
    return run([*prefix, *args], check=check)


def ip_batch(netns: str | None, commands: Sequence[str]) -> None:
    """Runs several `ip` commands in one process (one fork instead of many)."""
    prefix = ["ip", "-n", netns] if netns else ["ip"]
    result = subprocess.run(
        [*prefix, "-batch", "-"],
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise CommandError(
            f"ip -n {netns} -batch: {result.stderr.strip()}\ncommands:\n" + "\n".join(commands)
        )


def sysctl(netns: str, settings: dict[str, str]) -> None:
    """Sets sysctls inside `netns` (net.* entries are per namespace)."""
    run(["nsenter", f"--net={NETNS_DIR / netns}", "sysctl", "-q", *(f"{k}={v}" for k, v in settings.items())])


def enter(netns: str | None, argv: Sequence[str]) -> list[str]:
    """`argv` wrapped to run inside `netns` (None: unchanged, the current namespace)."""
    if netns is None:
        return list(argv)
    return ["nsenter", f"--net={NETNS_DIR / netns}", "--", *argv]


def exists(netns: str) -> bool:
    return (NETNS_DIR / netns).exists()


def create(netns: str) -> None:
    ip(None, "netns", "add", netns)
    ip(netns, "link", "set", "lo", "up")


def list_with_prefix(prefix: str) -> list[str]:
    """Names of the network namespaces starting with `prefix`."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def pids_in(netns: str) -> list[int]:
    """Processes whose network namespace is `netns`."""
    result = ip(None, "netns", "pids", netns, check=False)
    return [int(line) for line in result.stdout.split()] if result.returncode == 0 else []


def kill_all_in(netnses: Sequence[str], grace: float = 0.0) -> None:
    """Kills every process inside any of `netnses`: SIGTERM, up to `grace` seconds, then SIGKILL."""
    pids = {pid for ns in netnses for pid in pids_in(ns)}
    pids.discard(os.getpid())
    if grace > 0:
        signal_all(pids, signal.SIGTERM)
        wait_gone(pids, grace)
    signal_all(pids, signal.SIGKILL)
    wait_gone(pids, 5.0)


def signal_all(pids: set[int], signum: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def wait_gone(pids: set[int], timeout: float) -> bool:
    """Waits until none of `pids` is alive; False on timeout."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def delete(netns: str) -> None:
    """Deletes `netns` (its veths go with it); a namespace already gone is fine."""
    ip(None, "netns", "delete", netns, check=False)
