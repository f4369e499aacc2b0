"""ambient-agent: a node agent giving Kubernetes pods sidecar-less mutual TLS over HBONE."""

from __future__ import annotations

__version__ = "0.1.0"
