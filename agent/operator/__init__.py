"""Kubernetes control plane: enrolment, discovery and status handlers, and the CA signer."""
