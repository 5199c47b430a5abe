"""Benchmarks and baselines; scripts run from the repository root (``python -m bench.baselines_report``)."""
