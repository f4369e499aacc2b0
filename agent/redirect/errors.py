"""Failures of the redirection adapters: the kernel or a tool refused a read or a change.

Each adapter wraps its third-party exceptions (subprocess, pyroute2 netlink, file I/O) into one of
these, so the reconciler handles one family of errors: it logs them and retries with backoff.
"""

from __future__ import annotations


class RedirectError(Exception):
    """Reading or changing the node's capture state failed; retrying may succeed."""


class NftError(RedirectError):
    """`nft` failed or could not be run."""


class RoutingError(RedirectError):
    """A netlink request for ip rules or routes failed."""


class SysctlError(RedirectError):
    """A `/proc/sys` setting could not be read or written."""
