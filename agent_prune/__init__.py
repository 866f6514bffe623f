"""agent-prune: structured pruning of decoder-only LLMs, guided by a planner LLM."""

__version__ = "0.1.0"
