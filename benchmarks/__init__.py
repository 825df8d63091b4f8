"""Performance benchmarks (``make bench``); results land in ``benchmarks/results/``."""
