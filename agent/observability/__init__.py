"""Metrics, access logs, and the admin and readiness endpoints."""
