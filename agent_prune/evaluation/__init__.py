"""Evaluation: perplexity, knowledge probes, multiple choice, KL, error bars and paired comparisons."""
