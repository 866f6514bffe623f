"""Planners: the deterministic heuristic and LLM-backed ones, behind one interface."""
