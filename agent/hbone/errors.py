"""What can go wrong with a tunnel, each kind carrying its wire meaning (HTTP status or h2 code)."""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """HTTP/2 error codes of RST_STREAM and GOAWAY (RFC 9113 section 7).

    On a tunnel, a reset is the TCP reset of the tunnelled connection (RFC 9113 8.5): a proxy
    whose TCP side was reset sends CONNECT_ERROR, and a reset received is delivered as a TCP reset.
    """

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD

    @classmethod
    def from_wire(cls, code: int) -> ErrorCode:
        """The code a peer sent; unknown codes read as INTERNAL_ERROR, as RFC 9113 section 7 allows."""
        try:
            return cls(code)
        except ValueError:
            return cls.INTERNAL_ERROR


class RefusalReason(enum.Enum):
    """Why the server side refuses a tunnel, and the HTTP status it answers the CONNECT with."""

    MALFORMED_REQUEST = (400, "malformed request")
    """The CONNECT request is not a valid HBONE request (method, authority, pseudo-headers...)."""

    DENIED_BY_POLICY = (401, "denied by policy")
    """An authorization policy denies the client identity this destination."""

    NO_LOCAL_WORKLOAD = (503, "no local workload")
    """The target address is not a workload on this node."""

    UPSTREAM_REFUSED = (503, "upstream refused")
    """The destination workload refused the TCP connection."""

    UPSTREAM_UNREACHABLE = (503, "upstream unreachable")
    """The destination workload did not answer the TCP connection (timeout, no route)."""

    def __init__(self, status: int, description: str) -> None:
        self.status = status
        self.description = description


class TunnelFailure(enum.Enum):
    """What a client learns from a refused CONNECT's status (several reasons share 503)."""

    MALFORMED_REQUEST = "malformed request"
    """400: the server could not parse the request; a bug on one side."""

    DENIED = "denied by policy"
    """401 or 403: the destination's policy denies this client."""

    UNAVAILABLE = "destination unavailable"
    """503: no such workload at the destination node, or it refused or did not answer."""

    UNEXPECTED_STATUS = "unexpected status"
    """Any other non-2xx status."""

    @classmethod
    def from_status(cls, status: int) -> TunnelFailure:
        """The failure a non-2xx CONNECT response status stands for."""
        return _FAILURE_BY_STATUS.get(status, cls.UNEXPECTED_STATUS)


_FAILURE_BY_STATUS = {
    400: TunnelFailure.MALFORMED_REQUEST,
    401: TunnelFailure.DENIED,
    403: TunnelFailure.DENIED,
    503: TunnelFailure.UNAVAILABLE,
}


class HboneUsageError(RuntimeError):
    """The I/O layer called the HBONE layer in a way its state forbids (a bug, not a peer's doing):
    opening a tunnel on a connection that cannot take one, or sending after half-closing."""
