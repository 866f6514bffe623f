"""Corpora, calibration windows and evaluation task loaders (a local data dir, or the HF hub)."""
