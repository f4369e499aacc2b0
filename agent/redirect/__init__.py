"""Node traffic capture: the nftables TPROXY ruleset and policy routing for enrolled pods.

`ruleset` builds the desired state (pure), `plan` diffs it with what is installed (pure), the
adapters `nft`, `routing` and `sysctl` read and change the kernel, `reconciler` keeps the two
equal, `cleanup` removes it all, `command` is `ambient-agent redirect` and `ambient-agent cleanup`.
Design and its deviations from ARCHITECTURE.md: docs/redirect.md.
"""
