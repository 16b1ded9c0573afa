"""The operator's side: slot-health policy and its pass (`lag`, `health`), `prune`, `verify`,
`recovery` (repair/resume) and `history` (reading the change log back in time).
"""
