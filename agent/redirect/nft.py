"""The nftables adapter: runs `nft -j` to apply JSON transactions and to list the agent's table.

Every change goes through one `nft -j -f -` call, which the kernel applies as one transaction, so
a failed batch leaves the previous state intact. Only the agent's table is ever named.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from typing import Any

from agent.redirect.errors import NftError
from agent.redirect.ruleset import FAMILY, NftCommand

_TIMEOUT_SECONDS = 30.0
# nft reports a missing table with the kernel's ENOENT text; LC_ALL=C keeps it untranslated.
_ENOENT_TEXT = "No such file or directory"


class Nftables:
    """Runs the `nft` binary in the current network namespace."""

    def __init__(self, binary: str = "nft") -> None:
        self._binary = binary

    def apply(self, commands: Sequence[NftCommand]) -> None:
        """Applies `commands` as one transaction; on error nothing of it is applied."""
        self._check(self._run(["-j", "-f", "-"], stdin=json.dumps({"nftables": list(commands)})))

    def list_table(self, table: str) -> dict[str, Any] | None:
        """`nft -j list table inet <table>` parsed, or None when the table does not exist."""
        done = self._run(["-j", "list", "table", FAMILY, table])
        if done.returncode != 0 and _ENOENT_TEXT in done.stderr:
            return None
        try:
            listing: dict[str, Any] = json.loads(self._check(done))
        except ValueError as error:
            raise NftError(f"nft list table {FAMILY} {table}: output is not JSON: {error}") from error
        return listing

    def _run(self, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = [self._binary, *args]
        try:
            return subprocess.run(
                argv,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=_TIMEOUT_SECONDS,
                env={**os.environ, "LC_ALL": "C"},
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as error:
            raise NftError(f"{' '.join(argv)}: {error}") from error

    @staticmethod
    def _check(done: subprocess.CompletedProcess[str]) -> str:
        if done.returncode != 0:
            raise NftError(f"{' '.join(done.args)} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout
