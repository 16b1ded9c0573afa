"""Throwaway PostgreSQL servers: `cluster` builds one from the machine's server binaries (for the
test harness and `cdcengine demo`); `demo` is the PostgreSQL part of `cdcengine demo`.
"""
