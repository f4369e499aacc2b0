"""SPIFFE workload identities: IDs, keys, CSRs, certificates, TLS contexts and peer checks."""
