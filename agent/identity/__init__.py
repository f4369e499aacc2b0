"""SPIFFE workload identities: IDs, keys, CSRs, certificates, TLS contexts and peer checks.

`spiffe` (IDs), `csr` (keys, requests, the CA's request checks), `ca` (root and leaf signing),
`certificates` (trust bundles, workload certificates), `rotation` (renewal timing), `tls` (mutual TLS
contexts, peer verification), `manager` (the node's certificates: request, renew, drop), `testing` (a
throwaway CA for tests and demos).
"""
