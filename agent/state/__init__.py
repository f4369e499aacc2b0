"""The immutable snapshot of workloads, services and policies, and pure decisions over it."""
