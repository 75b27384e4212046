"""Commands around the recordings: check, ls/show/explain, report/prune, run."""
