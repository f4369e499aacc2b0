"""The `ambient-agent node` process: settings, the static configuration file, and the wiring of the
redirect reconciler, the data plane and the observability servers into one process.

- `settings`: the process's frozen settings from flags and environment;
- `config`: the static configuration file, read into the same `Snapshot` the control plane produces;
- `credentials`: workload certificates and the trust bundle from files, as the data plane asks for them;
- `logs`: application and access logging in text or JSON;
- `process`: start-up, reload, drain and exit.
"""
