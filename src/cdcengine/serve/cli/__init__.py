"""`cdcengine` command line (SPEC §3): `main` parses and dispatches, `operations` holds the slot
health and operator commands, `output` what every command shares (exit codes, printing).
"""
