"""The sysctl adapter: reads and writes kernel settings under `/proc/sys` (of the current netns)."""

from __future__ import annotations

from pathlib import Path

from agent.redirect.errors import SysctlError


class Sysctls:
    """Kernel settings by dotted name (`net.ipv4.tcp_fwmark_accept`), under `root`."""

    def __init__(self, root: Path = Path("/proc/sys")) -> None:
        self._root = root

    def read(self, name: str) -> str | None:
        """The setting's value, or None when this kernel has no such setting."""
        try:
            return self._path(name).read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise SysctlError(f"reading {name}: {error}") from error

    def write(self, name: str, value: str) -> None:
        """Sets the setting to `value`."""
        try:
            self._path(name).write_text(value)
        except OSError as error:
            raise SysctlError(f"writing {name}={value}: {error}") from error

    def ipv6_available(self) -> bool:
        """False when the kernel runs with IPv6 disabled (`ipv6.disable=1`): no IPv6 routing exists."""
        return (self._root / "net" / "ipv6").is_dir()

    def _path(self, name: str) -> Path:
        return self._root.joinpath(*name.split("."))
