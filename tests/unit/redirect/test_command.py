"""The `ambient-agent redirect` and `cleanup` command lines parse into runnable commands."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from agent.cli import build_parser
from agent.redirect.command import run_cleanup


def test_redirect_apply_takes_ipv4_and_ipv6_pod_addresses() -> None:
    args = build_parser().parse_args(["redirect", "apply", "--pod-ip", "10.1.0.5", "--pod-ip", "fd01::5"])
    assert args.pod_ips == [ip_address("10.1.0.5"), ip_address("fd01::5")]
    assert callable(args.run)


def test_redirect_run_without_pods_enrols_none() -> None:
    args = build_parser().parse_args(["redirect", "run"])
    assert args.pod_ips == []


@pytest.mark.parametrize(
    "argv",
    [
        ["redirect"],
        ["redirect", "apply", "--pod-ip", "10.1.0.300"],
        ["redirect", "apply", "--pod-ip", "pod-a"],
    ],
)
def test_bad_redirect_command_lines_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2


def test_cleanup_runs_the_real_removal() -> None:
    assert build_parser().parse_args(["cleanup"]).run is run_cleanup
