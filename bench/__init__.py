"""Benchmarks that print figures (run `python -m bench --help`); speed is measured, not asserted."""
