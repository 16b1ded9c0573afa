"""The data path of one source: stream → batches → the sink, exactly once (SPEC §5, §8).

`pipeline` runs it; `batcher` turns committed transactions into per-table Arrow batches;
`writer` hands them to the sink on its own thread; `progress` decides how far the slot may be
confirmed; `snapshots`/`resync` load tables; `tablesets` tracks what is captured; `runlog`
records the run.
"""
