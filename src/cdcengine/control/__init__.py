"""The operator's tools that run with or without a daemon: slot-health policy and its pass
(`lag`, `health`, `sweep`), `prune` of sources that left the config, `verify` (source against
Delta) and `history` (reading the change log back in time). They stand on the pipeline, the
sink and the state store, never on the library façade (`api`) or the daemon (`serve`).
"""
