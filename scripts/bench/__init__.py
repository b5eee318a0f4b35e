"""The parts of scripts/bench.py (run that script): the scenarios, the harness, one module per
phase, the report."""
