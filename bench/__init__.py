"""Benchmarks: each starts what it needs, measures its baseline in the same run and prints
one JSON object of its figures as its last line. Run from the repository root as
``python -m bench.<name>``."""
