"""`cdcengine` command line (SPEC §3): `main` parses and dispatches, `operations` holds the slot
health and operator commands, `output` what every command shares (exit codes, printing).

The command line's processes allocate Arrow memory through jemalloc unless the environment
names another pool (`ARROW_DEFAULT_MEMORY_POOL`, read once, when pyarrow is imported: so it is
set here, before any module of the command imports it). Why (issue 16): pyarrow's default,
mimalloc, keeps what a batch's conversion and folding freed, and delta-rs's own allocations
(the Parquet encoding of a Delta write) cannot reuse it; jemalloc returns it within its decay
time. Measured on one 1M-row batch of the bench table: sink peak 477 MB with mimalloc, 419 MB
with jemalloc. An embedding application keeps its own choice: only the command line sets it.
Linux only: pyarrow's Linux wheels carry jemalloc; elsewhere an unknown pool name would print a
warning.
"""

import os
import sys

if sys.platform == "linux":
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
