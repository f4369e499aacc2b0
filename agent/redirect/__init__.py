"""Node traffic capture: the nftables TPROXY ruleset and policy routing for enrolled pods."""
