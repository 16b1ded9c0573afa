"""What the adapter does to and reads from the server around the data path.

`catalog` reads table facts from pg_catalog; `discovery` lists tables for `cdcengine tables`;
`prerequisites` checks a source before it is enabled; `slots` and `publications` own the
replication resources, which `provision` creates, adopts and tears down; `health` probes a slot
for the lag policy; `verify` reads tables at an exact position for `cdcengine verify`.
"""
