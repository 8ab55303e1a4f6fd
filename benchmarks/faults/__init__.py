"""Fault and robustness loops that are too slow for the test suite (``python -m benchmarks.faults.<name>``)."""
