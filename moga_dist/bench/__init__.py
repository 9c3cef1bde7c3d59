"""Benchmarks: `python -m moga_dist.bench step|comm`. Ratios are measured side by side in one run."""
