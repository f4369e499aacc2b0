"""The command line lists its subcommands and refuses, loudly, the ones not built yet."""

from __future__ import annotations

import pytest

from agent.cli import NOT_BUILT_EXIT, build_parser, main


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("node", "ca", "cleanup"):
        assert command in out


def test_a_command_is_required() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code != 0


def test_every_subcommand_is_bound_to_a_runner() -> None:
    parser = build_parser()
    for command in ("node", "ca", "cleanup"):
        assert callable(parser.parse_args([command]).run)


def test_unbuilt_subcommand_says_so_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca"]) == NOT_BUILT_EXIT
    assert "not built yet" in capsys.readouterr().err
