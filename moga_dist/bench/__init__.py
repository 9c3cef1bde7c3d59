"""Benchmarks (recipes): `python -m moga_dist.bench step|comm|train|gpu`. Ratios are measured side by
side in one run; no benchmark is a test."""
