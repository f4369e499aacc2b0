"""The sysctl adapter reads and writes settings by dotted name under a `/proc/sys`-like root."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.redirect.errors import SysctlError
from agent.redirect.sysctl import Sysctls


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "net" / "ipv4" / "conf" / "all").mkdir(parents=True)
    (tmp_path / "net" / "ipv4" / "conf" / "all" / "src_valid_mark").write_text("1\n")
    return tmp_path


def test_reads_a_setting_by_dotted_name(root: Path) -> None:
    assert Sysctls(root).read("net.ipv4.conf.all.src_valid_mark") == "1"


def test_a_setting_the_kernel_lacks_reads_as_none(root: Path) -> None:
    assert Sysctls(root).read("net.ipv4.tcp_fwmark_accept") is None


def test_writes_a_setting(root: Path) -> None:
    Sysctls(root).write("net.ipv4.conf.all.src_valid_mark", "0")
    assert (root / "net" / "ipv4" / "conf" / "all" / "src_valid_mark").read_text() == "0"


def test_write_failures_name_the_setting(root: Path) -> None:
    with pytest.raises(SysctlError, match=r"net\.ipv6\.conf\.all\.forwarding=1"):
        Sysctls(root).write("net.ipv6.conf.all.forwarding", "1")


def test_ipv6_is_available_when_its_settings_exist(root: Path) -> None:
    assert not Sysctls(root).ipv6_available()
    (root / "net" / "ipv6").mkdir()
    assert Sysctls(root).ipv6_available()
