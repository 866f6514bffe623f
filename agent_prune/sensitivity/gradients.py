"""Memory-bounded gradients of the language-modelling loss, one decoder layer at a time.

The loss is the mean next-token cross-entropy over every calibration token, one gradient for the
whole set (as LLM-Pruner's Taylor score). Instead of one backward through the model:

1. :func:`output_gradient` turns the last layer's output into ``dL/dh`` in place, through the
   final norm and lm_head in chunks of ``chunk_tokens`` tokens, so full-vocabulary logits never
   exist for more than one chunk (the embedding and lm_head get no gradients).
2. :func:`layer_backward` re-runs one layer on its stored inputs (read back one batch at a time)
   with autograd on, back-propagates the incoming gradient, leaves the full-set gradient in the
   layer's weights' ``.grad`` and writes ``dL/dx`` for the layer below over the gradient buffer.
   The caller reads the statistics and frees the ``.grad`` tensors before the next layer, so at
   most one layer's weight gradients exist.

Peak extra memory: one ``samples x seqlen x hidden`` buffer (hidden states, then gradients), one
batch's autograd graph through one layer plus that batch's stored inputs, one layer's weight
gradients, and one logits chunk (``chunk_tokens x vocab``, a few copies).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from agent_prune.models.adapters import FamilyAdapter
from agent_prune.models.streaming import on_device, run_layer

DEFAULT_CHUNK_TOKENS = 64


def output_gradient(
    adapter: FamilyAdapter,
    hidden: torch.Tensor,
    windows: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> float:
    """Replace ``hidden`` (the last layer's output, samples x seqlen x dim) by ``dL/dh``; return ``L``.

    Works in place, chunk by chunk: a chunk's hidden states are consumed before its gradient is
    written over them, so no second full-size buffer exists. The last position of each window
    predicts nothing, so its gradient is zero.
    """
    samples, seqlen, _ = hidden.shape
    labels = windows.to(hidden.device)
    predicted = samples * (seqlen - 1)
    total = 0.0
    with on_device(adapter.final_norm(), hidden.device), on_device(adapter.lm_head(), hidden.device):
        for i in range(samples):
            for start in range(0, seqlen - 1, chunk_tokens):
                stop = min(start + chunk_tokens, seqlen - 1)
                h = hidden[i, start:stop].detach().clone().requires_grad_(True)
                with torch.enable_grad():
                    logits = adapter.output_logits(h).float()
                    targets = labels[i, start + 1 : stop + 1]
                    loss = F.cross_entropy(logits, targets, reduction="sum") / predicted
                    loss.backward()
                hidden[i, start:stop] = h.grad
                total += float(loss.detach())
                del logits, loss
            hidden[i, seqlen - 1] = 0
    return total


def layer_backward(
    layer: torch.nn.Module,
    weights: list[torch.nn.Parameter],
    load_inputs: Callable[[slice], torch.Tensor],
    grad_output: torch.Tensor,
    batches: list[slice],
    kwargs: dict,
) -> torch.Tensor:
    """Accumulate ``dL/dW`` into ``weights[*].grad``; return ``dL/dx`` (written over ``grad_output``).

    ``load_inputs(batch)`` returns the layer's stored inputs for those samples (so only one batch
    of them is in memory); ``kwargs`` are the layer's keyword arguments (the same for every batch).
    """
    for weight in weights:
        weight.requires_grad_(True)
    try:
        for batch in batches:
            x = load_inputs(batch).detach().requires_grad_(True)
            with torch.enable_grad():
                y = run_layer(layer, x, kwargs)
                torch.autograd.backward(y, grad_output[batch])
            grad_output[batch] = x.grad
            del x, y
    finally:
        for weight in weights:
            weight.requires_grad_(False)
    return grad_output
