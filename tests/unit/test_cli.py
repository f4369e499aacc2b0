"""The command line lists its subcommands, binds each to its runner, and refuses invalid settings."""

from __future__ import annotations

import re

import pytest

from agent.cli import SETTINGS_EXIT, build_parser, main


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^    (\w+)  ", out, re.MULTILINE)
    assert listed == ["node", "ca", "cleanup", "redirect"]


def test_a_command_is_required() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code != 0


def test_every_subcommand_is_bound_to_a_runner() -> None:
    parser = build_parser()
    for command in ("node", "ca", "cleanup"):
        assert callable(parser.parse_args([command]).run)


def test_ca_refuses_an_invalid_setting_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca", "--leaf-lifetime", "forever"]) == SETTINGS_EXIT
    assert "leaf_lifetime: not a duration" in capsys.readouterr().err
