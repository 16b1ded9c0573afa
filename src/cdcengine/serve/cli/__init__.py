"""`cdcengine` command line (SPEC §3): `main` parses and dispatches, `operations` holds the slot
health and operator commands, `output` what every command shares (exit codes, printing).

The command line's processes allocate Arrow memory through jemalloc, which hands freed pages
back to the system after 200 ms, unless the environment says otherwise
(`ARROW_DEFAULT_MEMORY_POOL`, `JE_ARROW_MALLOC_CONF`: read once, when pyarrow is imported, so
they are set here, before any module of the command imports them). Why (issue 16): pyarrow's
default, mimalloc, keeps what a batch's conversion and folding freed, while delta-rs's own
allocations (the Parquet encoding of a Delta write, right after the folding) cannot reuse any
of it; the sink also hands the pool's freed pages back before each large write
(`sink.delta.spool`). Measured on the bench, same minutes, 2 runs each: with jemalloc's decay
at 0 (pages returned at every free) streaming 1M inserts took 10.6-12.2 s (7.6-8.1 s with
Arrow's default decay) — too slow; with Arrow's default decay plus the release before large
writes, the 1M-row transaction peaked at 531-534 MB (goal 512); with 200 ms / muzzy 0 plus
the release, 467-478 MB, and inserts took 7.0-9.5 s beside `pg_recvlogical`'s 8.0-9.7 s. An
embedding application keeps its own choice: only the command line sets these. Linux only:
pyarrow's Linux wheels carry jemalloc; elsewhere an unknown pool name would print a warning.
"""

import os
import sys

if sys.platform == "linux":
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
    if os.environ["ARROW_DEFAULT_MEMORY_POOL"] == "jemalloc":
        os.environ.setdefault("JE_ARROW_MALLOC_CONF", "dirty_decay_ms:200,muzzy_decay_ms:0")
