"""The nftables adapter's handling of `nft` outcomes: a missing table is a value, failures are NftError.

These run stand-in programs in place of `nft` (no root needed); the real `nft` runs in the e2e tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.redirect.errors import NftError
from agent.redirect.nft import Nftables


def program(tmp_path: Path, script: str) -> str:
    path = tmp_path / "nft"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return str(path)


def test_a_missing_table_lists_as_none(tmp_path: Path) -> None:
    nft = program(tmp_path, 'echo "Error: No such file or directory" >&2; exit 1')
    assert Nftables(nft).list_table("ambient_agent") is None


def test_a_listing_is_parsed_and_the_table_is_named(tmp_path: Path) -> None:
    listing = {"nftables": [{"table": {"family": "inet", "name": "ambient_agent"}}]}
    nft = program(tmp_path, f"echo \"$*\" > {tmp_path}/args; echo '{json.dumps(listing)}'")
    assert Nftables(nft).list_table("ambient_agent") == listing
    assert (tmp_path / "args").read_text().split() == ["-j", "list", "table", "inet", "ambient_agent"]


def test_a_transaction_goes_to_stdin_as_one_document(tmp_path: Path) -> None:
    nft = program(tmp_path, f'echo "$*" > {tmp_path}/args; cat > {tmp_path}/stdin')
    commands = [{"add": {"table": {"family": "inet", "name": "ambient_agent"}}}]
    Nftables(nft).apply(commands)
    assert (tmp_path / "args").read_text().split() == ["-j", "-f", "-"]
    assert json.loads((tmp_path / "stdin").read_text()) == {"nftables": commands}


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ('echo "Error: Operation not permitted" >&2; exit 1', "exited 1: Error: Operation not permitted"),
        ("echo not json", "output is not JSON"),
    ],
)
def test_listing_failures_are_nft_errors(tmp_path: Path, script: str, message: str) -> None:
    with pytest.raises(NftError, match=message):
        Nftables(program(tmp_path, script)).list_table("ambient_agent")


def test_a_failed_transaction_is_an_nft_error(tmp_path: Path) -> None:
    nft = program(tmp_path, 'echo "Error: Could not process rule: No such file or directory" >&2; exit 1')
    with pytest.raises(NftError, match="Could not process rule"):
        Nftables(nft).apply([{"delete": {"element": {}}}])


def test_a_missing_nft_binary_is_an_error_not_a_missing_table(tmp_path: Path) -> None:
    with pytest.raises(NftError, match="No such file or directory"):
        Nftables(str(tmp_path / "absent")).list_table("ambient_agent")
