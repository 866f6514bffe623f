"""Small accumulators fed one calibration batch at a time: ``add_batch`` / ``finalize`` / ``free``.

A collector holds only vectors the size of a module's input or output (never activations), so a
whole layer's collectors cost a few kilobytes to a few megabytes whatever the calibration size.
The math lives in :mod:`agent_prune.sensitivity.metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from agent_prune.models.streaming import batch_slices
from agent_prune.sensitivity import metrics

# Tokens per chunk when projecting head outputs through o_proj (bounds a tokens x heads x hidden buffer).
HEAD_CHUNK_TOKENS = 128
# Tokens whose float temporaries (squares, absolute values) are taken together. A refit pass hands
# the collectors 8 windows at once, and their 10-25 MB temporaries raised the build's peak by about
# 100 MiB; 1024 is the profile's own batch (two 512-token windows), so its sums keep their bits.
COLLECT_TOKENS = 1024


def column_peaks(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``y.abs().max(dim=0)`` of ``(tokens, channels)`` values, a chunk of tokens at a time (the
    first chunk's token wins a tie between chunks)."""
    peak = token = None
    for rows in batch_slices(y.shape[0], COLLECT_TOKENS):
        chunk_peak, chunk_token = y[rows].float().abs().max(dim=0)
        chunk_token = chunk_token + rows.start
        if peak is None:
            peak, token = chunk_peak, chunk_token
        else:
            better = chunk_peak > peak
            peak, token = torch.where(better, chunk_peak, peak), torch.where(better, chunk_token, token)
    return peak, token


class LinearCollector:
    """What Wanda needs from one linear module: the per-input-channel sum of squared activations.

    Modules that read the same tensor (q/k/v, gate/up) can share one accumulator: pass the
    collector that is hooked as ``shares_input_with`` and do not hook this one.
    """

    def __init__(self, module: nn.Linear, shares_input_with: LinearCollector | None = None,
                 moments: bool = False, hessian: bool = False):
        self.module = module
        self.source = shares_input_with
        device, width = module.weight.device, module.in_features
        self.sum_squares = torch.zeros(width, dtype=torch.float64, device=device)
        # Output projections also keep per-channel sums (means, for fluctuation scores and bias
        # compensation) and, when OBS scores are wanted, the input Gram matrix X^T X.
        self.sums = torch.zeros(width, dtype=torch.float64, device=device) if moments else None
        self.xtx = torch.zeros(width, width, dtype=torch.float64, device=device) if hessian else None
        self.samples = 0
        self.tokens = 0

    def add_batch(self, inputs: torch.Tensor, output: torch.Tensor) -> None:
        flat = inputs.detach().reshape(-1, inputs.shape[-1])
        for rows in batch_slices(flat.shape[0], COLLECT_TOKENS):
            chunk = flat[rows].float()
            self.sum_squares += chunk.pow(2).sum(dim=0).double()
            if self.sums is not None:
                self.sums += chunk.sum(dim=0).double()
            if self.xtx is not None:
                self.xtx += metrics.gram(chunk)  # a chunk in float32, the running sum in float64
        self.samples += inputs.shape[0] if inputs.dim() > 2 else 1
        self.tokens += flat.shape[0]

    def input_mean(self) -> torch.Tensor:
        """Mean over calibration tokens of each input channel (needs ``moments``)."""
        return (self.sums / max(self.tokens, 1)).float()

    def input_norm(self) -> torch.Tensor:
        if self.source is not None:
            return self.source.input_norm()
        return metrics.input_channel_norm(self.sum_squares, self.samples).float()

    def finalize(self) -> torch.Tensor:
        """Per-weight Wanda scores ``|W| * ||X_j||`` for the module's current weight."""
        return metrics.wanda_scores(self.module.weight, self.input_norm())

    def free(self) -> None:
        self.sum_squares = torch.empty(0)
        self.sums = self.xtx = None

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.add_batch(args[0], output)


class HeadCollector(LinearCollector):
    """For ``o_proj``: also the AMP head importance, mean over tokens of ``||W_o[:, h] z_h||_1``."""

    def __init__(self, module: nn.Linear, head_dim: int, hessian: bool = False):
        super().__init__(module, moments=True, hessian=hessian)
        self.head_dim = head_dim
        heads = module.in_features // head_dim
        self.head_l1 = torch.zeros(heads, dtype=torch.float64, device=module.weight.device)

    def add_batch(self, inputs: torch.Tensor, output: torch.Tensor) -> None:
        super().add_batch(inputs, output)
        flat = inputs.detach().reshape(-1, inputs.shape[-1])
        weight = self.module.weight
        for rows in batch_slices(flat.shape[0], HEAD_CHUNK_TOKENS):
            self.head_l1 += metrics.head_output_l1(flat[rows], weight, self.head_dim).sum(0).double()

    def head_scores(self) -> torch.Tensor:
        return (self.head_l1 / max(self.tokens, 1)).float()

    def free(self) -> None:
        super().free()
        self.head_l1 = torch.empty(0)


@dataclass(frozen=True)
class SpikeCandidate:
    """The largest |output| of one down_proj output channel and the weight that carried it."""

    row: int            # output (hidden) channel of down_proj
    column: int         # input (MLP intermediate) channel that contributed most at that token
    output: float       # |y_row| at the spike token
    input: float        # a_column at the spike token
    weight: float       # W[row, column]
    ratio: float        # output over the layer's median channel peak
    residual_in: float  # hidden state[row] entering the layer at the spike token
    residual_out: float  # hidden state[row] leaving the layer at the spike token


class ChannelCollector(LinearCollector):
    """For ``down_proj``: AMP channel importance and the super-activation trace (Apple, 2411.07191).

    For every output channel it keeps the largest ``|y|`` seen and, at that token, the input
    channel whose product ``a_c * W[row, c]`` contributed most: that weight is the candidate.
    :meth:`observe_layer` adds the residual stream's value of that channel before and after the
    layer, which tells a spike that *creates* a massive activation (a super weight) from one that
    cancels an existing one (late layers do this; zeroing such a weight changes little).
    """

    def __init__(self, module: nn.Linear, hessian: bool = False):
        super().__init__(module, moments=True, hessian=hessian)
        device = module.weight.device
        self.abs_sum = torch.zeros(module.in_features, dtype=torch.float64, device=device)
        self.out_max = torch.zeros(module.out_features, device=device)
        self.out_column = torch.zeros(module.out_features, dtype=torch.long, device=device)
        self.out_input = torch.zeros(module.out_features, device=device)
        self.residual_in = torch.zeros(module.out_features, device=device)
        self.residual_out = torch.zeros(module.out_features, device=device)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def add_batch(self, inputs: torch.Tensor, output: torch.Tensor) -> None:
        super().add_batch(inputs, output)
        a = inputs.detach().reshape(-1, inputs.shape[-1])
        for rows in batch_slices(a.shape[0], COLLECT_TOKENS):
            self.abs_sum += a[rows].float().abs().sum(dim=0).double()
        peak, token = column_peaks(output.detach().reshape(-1, output.shape[-1]))
        better = peak > self.out_max
        self._pending = None
        if not bool(better.any()):
            return
        rows = better.nonzero().squeeze(1)
        self._pending = (rows, token[rows])
        at_token = a[token[rows]].float()                           # (rows, in)
        contribution = (at_token * self.module.weight.detach().float()[rows]).abs()
        column = contribution.argmax(dim=1)
        self.out_max[rows] = peak[rows]
        self.out_column[rows] = column
        self.out_input[rows] = at_token.gather(1, column.unsqueeze(1)).squeeze(1)

    def observe_layer(self, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        """The layer's input and output for the batch just seen: residual values at new peaks."""
        if self._pending is None:
            return
        rows, tokens = self._pending
        self.residual_in[rows] = x_in.detach().reshape(-1, x_in.shape[-1])[tokens, rows].float()
        self.residual_out[rows] = x_out.detach().reshape(-1, x_out.shape[-1])[tokens, rows].float()
        self._pending = None

    def channel_scores(self) -> torch.Tensor:
        return (metrics.channel_output_l1(self.abs_sum, self.module.weight) / max(self.tokens, 1)).float()

    def spikes(self, ratio: float, min_output: float) -> list[SpikeCandidate]:
        """Output channels peaking at ``ratio`` x the median channel peak (and ``min_output``) or
        more, where the layer leaves the residual channel larger in magnitude than it found it."""
        median = float(self.out_max.median())
        threshold = max(ratio * median, min_output)
        grows = self.residual_out.abs() > self.residual_in.abs()
        rows = ((self.out_max >= threshold) & grows).nonzero().squeeze(1).tolist()
        weight = self.module.weight.detach()
        return [
            SpikeCandidate(
                row=r, column=int(self.out_column[r]), output=float(self.out_max[r]),
                input=float(self.out_input[r]), weight=float(weight[r, int(self.out_column[r])]),
                ratio=float(self.out_max[r]) / max(median, metrics.EPS),
                residual_in=float(self.residual_in[r]), residual_out=float(self.residual_out[r]),
            )
            for r in rows
        ]

    def peak_ratio(self) -> float:
        """Largest channel peak over the median channel peak (how spiky this layer's output is)."""
        return float(self.out_max.max() / self.out_max.median().clamp_min(metrics.EPS))

    def free(self) -> None:
        super().free()
        self.abs_sum = self.out_max = self.out_column = self.out_input = torch.empty(0)
        self.residual_in = self.residual_out = torch.empty(0)


class DepthCollector:
    """Block Influence (mean token cosine) and last-token angular distance of one decoder layer."""

    def __init__(self):
        self.cosine_sum = 0.0
        self.tokens = 0
        self.angular_sum = 0.0
        self.samples = 0

    def add_batch(self, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        cosine = metrics.token_cosine(x_in, x_out)                  # (batch, seq)
        self.cosine_sum += float(cosine.double().sum())
        self.tokens += cosine.numel()
        self.angular_sum += float(metrics.angular_distance(cosine[:, -1]).double().sum())
        self.samples += cosine.shape[0]

    def block_influence(self) -> float:
        return 1.0 - self.cosine_sum / max(self.tokens, 1)

    def angular_distance(self) -> float:
        return self.angular_sum / max(self.samples, 1)
