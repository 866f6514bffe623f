"""agent-prune against classic structured pruning, side by side (issue 8): ``python -m bench.compare``."""
