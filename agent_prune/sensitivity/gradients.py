"""Memory-bounded gradients of the language-modelling loss, one decoder layer at a time.

The loss is the mean next-token cross-entropy over every calibration token, one gradient for the
whole set (as LLM-Pruner's Taylor score). Instead of one backward through the model:

1. :func:`output_gradient` computes ``dL/dh`` for the last layer's output through the final
   norm and lm_head in chunks of ``chunk_tokens`` tokens, so full-vocabulary logits never exist
   for more than one chunk (the embedding and lm_head get no gradients).
2. :func:`layer_backward` re-runs one layer on its stored inputs with autograd on, batch by
   batch, back-propagates the incoming gradient, leaves the full-set gradient in the layer's
   weights' ``.grad`` and returns ``dL/dx`` for the layer below. The caller reads the statistics
   and frees the ``.grad`` tensors before the next layer, so at most one layer's gradients exist.

Peak extra memory: inputs + gradient buffers of one layer (2 x samples x seqlen x hidden), one
batch's autograd graph through one layer, one layer's weight gradients, and one logits chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agent_prune.models.adapters import FamilyAdapter
from agent_prune.sensitivity.streaming import on_device, run_layer

DEFAULT_CHUNK_TOKENS = 256


def output_gradient(
    adapter: FamilyAdapter,
    hidden: torch.Tensor,
    windows: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, float]:
    """``dL/dh`` for the last layer's output ``hidden`` (samples, seqlen, dim) and the loss ``L``."""
    samples, seqlen, _ = hidden.shape
    labels = windows.to(hidden.device)
    predicted = samples * (seqlen - 1)
    grad = torch.zeros_like(hidden)
    total = 0.0
    with on_device(adapter.final_norm(), hidden.device), on_device(adapter.lm_head(), hidden.device):
        for i in range(samples):
            for start in range(0, seqlen - 1, chunk_tokens):
                stop = min(start + chunk_tokens, seqlen - 1)
                h = hidden[i, start:stop].detach().requires_grad_(True)
                with torch.enable_grad():
                    logits = adapter.output_logits(h).float()
                    targets = labels[i, start + 1 : stop + 1]
                    loss = F.cross_entropy(logits, targets, reduction="sum") / predicted
                    loss.backward()
                grad[i, start:stop] = h.grad
                total += float(loss.detach())
                del logits, loss
    return grad, total


def layer_backward(
    layer: torch.nn.Module,
    weights: list[torch.nn.Parameter],
    inputs: torch.Tensor,
    grad_output: torch.Tensor,
    batches: list[slice],
    kwargs: list[dict],
) -> torch.Tensor:
    """Accumulate ``dL/dW`` into ``weights[*].grad``; return ``dL/dx`` (written over ``grad_output``).

    ``kwargs[b]`` are the layer's keyword arguments for batch ``b`` (masks, position embeddings).
    """
    for weight in weights:
        weight.requires_grad_(True)
    try:
        for batch, layer_kwargs in zip(batches, kwargs):
            x = inputs[batch].detach().requires_grad_(True)
            with torch.enable_grad():
                y = run_layer(layer, x, layer_kwargs)
                torch.autograd.backward(y, grad_output[batch])
            grad_output[batch] = x.grad
            del x, y
    finally:
        for weight in weights:
            weight.requires_grad_(False)
    return grad_output
