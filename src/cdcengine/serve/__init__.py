"""Front-ends that run the engine: the daemon and its per-source runners, the slot monitor and
the watchdog, the HTTP endpoints, logging set-up, the command line (`cli/`) and the demo.
"""
