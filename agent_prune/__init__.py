"""agent-prune: structured pruning of decoder-only LLMs, guided by a planner LLM."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: importing the package must stay cheap (no torch/transformers until needed).
    if name == "load_pretrained":
        from agent_prune.models.export import load_pretrained

        return load_pretrained
    if name == "prune":
        from agent_prune.api import prune

        return prune
    raise AttributeError(f"module 'agent_prune' has no attribute '{name}'")
