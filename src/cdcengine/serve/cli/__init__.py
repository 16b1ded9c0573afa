"""`cdcengine` command line (SPEC §3): `main` parses and dispatches, `operations` holds the slot
health and operator commands, `output` what every command shares (exit codes, printing).

The command line's processes allocate Arrow memory through jemalloc, returning freed pages to
the system at once, unless the environment says otherwise (`ARROW_DEFAULT_MEMORY_POOL`,
`JE_ARROW_MALLOC_CONF`: read once, when pyarrow is imported, so they are set here, before any
module of the command imports it). Why (issue 16): pyarrow's default, mimalloc, keeps what a
batch's conversion and folding freed, and so does jemalloc for its decay time (1 s), while
delta-rs's own allocations (the Parquet encoding of a Delta write, right after the folding)
cannot reuse any of it. Measured on one 1M-row transaction of the bench table (the bench's
`bigtxn`, process peak RSS): 543-546 MB with jemalloc's default decay, 446-461 MB with none; on
the sink alone 477 MB with mimalloc, 419 MB with jemalloc. An embedding application keeps its
own choice: only the command line sets these. Linux only: pyarrow's Linux wheels carry
jemalloc; elsewhere an unknown pool name would print a warning.
"""

import os
import sys

if sys.platform == "linux":
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
    if os.environ["ARROW_DEFAULT_MEMORY_POOL"] == "jemalloc":
        os.environ.setdefault("JE_ARROW_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0")
