"""Prefill and decode throughput of several models, measured side by side in one process.

Prefill: one forward of ``seqlen`` tokens at batch 1 with the KV cache on and logits for the last
position only (what ``generate`` does first). Decode: ``decode_tokens`` single-token steps with
the KV cache after a ``context``-token prompt. Repetitions are interleaved across models (order
rotated each round) so that load from other processes hits every model alike; medians are reported.
"""

from __future__ import annotations

import statistics
import time

import torch

PROTOCOL = ("speed: batch 1, random token ids (seed 0); prefill = one {seqlen}-token forward with "
            "KV cache, last-position logits; decode = {decode} cached single-token steps after a "
            "{context}-token prompt; {reps} interleaved repetitions after a warm-up, median")


def _sync(ids: torch.Tensor) -> None:
    """Wait for queued GPU work, so wall-clock intervals cover it (a no-op on the CPU)."""
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)


@torch.inference_mode()
def _prefill(model, ids: torch.Tensor) -> float:
    _sync(ids)
    start = time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1)
    _sync(ids)
    return time.perf_counter() - start


@torch.inference_mode()
def _decode(model, ids: torch.Tensor, context: int, steps: int) -> float:
    out = model(ids[:, :context], use_cache=True, logits_to_keep=1)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    _sync(ids)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    _sync(ids)
    return time.perf_counter() - start


def measure_speed(models: dict, *, seqlen: int = 256, context: int = 64, decode_tokens: int = 32,
                  reps: int = 3) -> dict:
    """``{name: {"prefill_tokens_per_s", "decode_tokens_per_s"}, "protocol": str}``."""
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, first.config.vocab_size, (1, seqlen), generator=generator).to(device)
    names = list(models)
    for name in names:  # warm-up
        _prefill(models[name], ids)
        _decode(models[name], ids, context, 2)
    times = {name: {"prefill": [], "decode": []} for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            times[name]["prefill"].append(_prefill(models[name], ids))
            times[name]["decode"].append(_decode(models[name], ids, context, decode_tokens))
    result: dict = {
        name: {"prefill_tokens_per_s": round(seqlen / statistics.median(t["prefill"]), 1),
               "decode_tokens_per_s": round(decode_tokens / statistics.median(t["decode"]), 1)}
        for name, t in times.items()
    }
    result["protocol"] = PROTOCOL.format(seqlen=seqlen, decode=decode_tokens, context=context, reps=reps)
    return result
