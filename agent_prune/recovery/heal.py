"""Distillation healing: train a pruned student toward the dense teacher on calibration text.

The loss is logit distillation, KL(teacher || student) per token (:mod:`.distill`), as Minitron
heals width- and depth-pruned models (Muralidharan et al., arXiv 2407.14679). The trained weights are
either LoRA adapters (Hu et al., arXiv 2106.09685; LLM-Pruner and MoP heal this way) merged back into
the projections at the end, or chosen projections trained in full; either way the result is a plain
dense model that stock transformers loads. Training stops at a token budget or a wall-clock budget,
whichever comes first; the learning rate follows warmup then cosine decay over that budget.

Only calibration text (C4) may be passed as ``windows``; never an evaluation split.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, Field
from torch import nn

from agent_prune.errors import InputError
from agent_prune.models.adapters import MLP_PROJECTIONS, adapter_for
from agent_prune.models.streaming import batch_slices
from agent_prune.recovery.distill import TopK, kl_full, kl_top_k, top_k
from agent_prune.recovery.layout import Layout, layer_sources, mark_overridden

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", *MLP_PROJECTIONS)


class HealSettings(BaseModel):
    """How to heal. The defaults are the setting of docs/benchmarks.md (Recovery), not a swept optimum."""

    max_tokens: int = Field(gt=0)
    max_seconds: float | None = Field(default=None, gt=0)
    method: Literal["lora", "full"] = "lora"
    modules: list[str] = Field(default_factory=lambda: list(ALL_PROJECTIONS))
    lora_rank: int = Field(default=16, gt=0)
    lr: float | None = Field(default=None, gt=0)  # None: 1e-3 for LoRA, 5e-5 for full fine-tuning
    batch_size: int = Field(default=4, gt=0)
    warmup: float = Field(default=0.03, ge=0, lt=1)
    teacher_top_k: int | None = Field(default=None, gt=0)  # distil toward top-k + tail instead of full
    bf16: bool = False  # bfloat16 autocast for the forward and backward passes (weights stay fp32)
    seed: int = 0

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.method == "lora" else 5e-5)


class HealPoint(BaseModel):
    tokens: int
    seconds: float
    kl: float  # training KL of the step (nats/token)


class HealReport(BaseModel):
    kl_before: float | None  # mean KL on the held-out calibration windows, nats/token
    kl_after: float | None
    tokens: int
    steps: int
    seconds: float  # training time (excluding the progress callback and the KL measurements)
    stopped_by: Literal["tokens", "seconds"]
    settings: HealSettings
    overrides: list[str]  # stable keys of the modules healing changed, e.g. "L12.mlp.down_proj"
    curve: list[HealPoint]


class HealProgress(BaseModel):
    tokens: int
    max_tokens: int
    seconds: float
    max_seconds: float | None
    kl: float

    @property
    def fraction(self) -> float:
        by_time = self.seconds / self.max_seconds if self.max_seconds else 0.0
        return min(1.0, max(self.tokens / self.max_tokens, by_time))


@torch.no_grad()
def mean_kl(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean per-token KL(teacher || student) over ``windows`` (nats/token)."""
    total = 0.0
    for part in batch_slices(windows.shape[0], batch_size):
        ids = windows[part]
        kl = kl_full(student(input_ids=ids, use_cache=False).logits,
                     teacher(input_ids=ids, use_cache=False).logits)
        total += float(kl) * ids.shape[0]
    return total / windows.shape[0]


def heal(
    student: nn.Module,
    teacher: nn.Module,
    windows: torch.Tensor,
    settings: HealSettings,
    *,
    eval_windows: torch.Tensor | None = None,
    manifest: Layout | None = None,
    progress: Callable[[HealProgress], None] | None = None,
) -> HealReport:
    """Heal ``student`` in place toward ``teacher`` on ``windows`` (calibration token ids).

    ``eval_windows`` (held-out calibration windows) give the KL before and after. ``manifest`` (the
    pruning manifest, or the dense index of each student layer) names the changed modules by original
    layer; a manifest also gets them marked overridden so checkpoints keep their values.
    """
    _check(student, windows, settings)
    kl_before = mean_kl(student, teacher, eval_windows) if eval_windows is not None else None
    weights = _LoraWeights if settings.method == "lora" else _FullWeights
    trainable = weights(student, settings)
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    try:
        tokens, steps, seconds, stopped_by, curve = _train(student, teacher, windows, settings, optimizer,
                                                           progress)
    finally:
        trainable.finish()
    student.eval()
    kl_after = mean_kl(student, teacher, eval_windows) if eval_windows is not None else None
    return HealReport(
        kl_before=kl_before, kl_after=kl_after, tokens=tokens, steps=steps, seconds=seconds,
        stopped_by=stopped_by, settings=settings, overrides=_record_overrides(student, settings, manifest),
        curve=curve,
    )


def _check(student: nn.Module, windows: torch.Tensor, settings: HealSettings) -> None:
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise InputError("healing needs a (windows, seqlen) tensor of calibration token ids",
                         "pass calibration windows from C4")
    names = set(ALL_PROJECTIONS)
    unknown = [m for m in settings.modules if m not in names]
    if unknown or not settings.modules:
        raise InputError(f"unknown modules to heal: {unknown or '(none)'}", f"choose from {', '.join(names)}")


def _train(student, teacher, windows, settings, optimizer, progress):
    generator = torch.Generator().manual_seed(settings.seed)
    tokens = steps = 0
    seconds, last_step, curve = 0.0, 0.0, []
    while True:
        order = torch.randperm(windows.shape[0], generator=generator)
        for part in batch_slices(windows.shape[0], settings.batch_size):
            ids = windows[order[part]]
            if tokens + ids.numel() > settings.max_tokens and steps:
                return tokens, steps, seconds, "tokens", curve
            if settings.max_seconds is not None and seconds + last_step > settings.max_seconds and steps:
                return tokens, steps, seconds, "seconds", curve
            started = time.perf_counter()
            fraction = max(tokens / settings.max_tokens,
                           seconds / settings.max_seconds if settings.max_seconds else 0.0)
            _set_lr(optimizer, settings.learning_rate * _schedule(fraction, settings.warmup))
            kl = _step(student, teacher, ids, settings, optimizer)
            last_step = time.perf_counter() - started
            seconds += last_step
            tokens += ids.numel()
            steps += 1
            curve.append(HealPoint(tokens=tokens, seconds=round(seconds, 3), kl=kl))
            if progress is not None:
                progress(HealProgress(tokens=tokens, max_tokens=settings.max_tokens, seconds=seconds,
                                      max_seconds=settings.max_seconds, kl=kl))


def _step(student, teacher, ids, settings, optimizer) -> float:
    device = ids.device.type
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=settings.bf16):
        teacher_logits = teacher(input_ids=ids, use_cache=False).logits
    target: torch.Tensor | TopK = (top_k(teacher_logits, settings.teacher_top_k)
                                   if settings.teacher_top_k else teacher_logits)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=settings.bf16):
        logits = student(input_ids=ids, use_cache=False).logits
    loss = kl_top_k(logits, target) if isinstance(target, TopK) else kl_full(logits, target)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _schedule(fraction: float, warmup: float) -> float:
    """Linear warmup over the first ``warmup`` of the budget, then cosine decay to 10%."""
    if warmup > 0 and fraction < warmup:
        return max(fraction / warmup, 0.05)
    progress = (fraction - warmup) / (1 - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class _LoraWeights:
    """LoRA adapters (peft) on the chosen projections; ``finish`` merges them back into plain Linears
    with peft's own ``merge_and_unload``, which also drops the ``peft_config`` it attached."""

    def __init__(self, student: nn.Module, settings: HealSettings):
        from peft import LoraConfig, get_peft_model

        self.student = student
        config = LoraConfig(r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, lora_dropout=0.0,
                            target_modules=list(settings.modules), bias="none")
        torch.manual_seed(settings.seed)
        # get_peft_model wraps the student but injects the adapters into its modules in place, and
        # leaves only the adapters trainable.
        self.peft_model = get_peft_model(student, config)
        self.params = [p for p in student.parameters() if p.requires_grad]

    def parameters(self) -> list[nn.Parameter]:
        return self.params

    def finish(self) -> None:
        merged = self.peft_model.merge_and_unload()
        if merged is not self.student:  # healing is in place; a peft that copies must fail loudly
            raise RuntimeError("peft's merge_and_unload returned a new model instead of the student")
        for param in self.student.parameters():
            param.requires_grad_(False)


class _FullWeights:
    """Full fine-tuning of the chosen projections' weights in every layer."""

    def __init__(self, student: nn.Module, settings: HealSettings):
        self.student = student
        for param in student.parameters():
            param.requires_grad_(False)
        self.params = [linear.weight for _key, linear in _chosen_linears(student, settings.modules)]
        for param in self.params:
            param.requires_grad_(True)

    def parameters(self) -> list[nn.Parameter]:
        return self.params

    def finish(self) -> None:
        for param in self.params:
            param.requires_grad_(False)


def _chosen_linears(model: nn.Module, modules: Sequence[str]):
    adapter = adapter_for(model)
    for index, layer in enumerate(adapter.layers()):
        for name, linear in adapter.linear_modules(layer).items():
            if name.split(".")[-1] in modules:
                yield (index, name), linear


def _record_overrides(model, settings: HealSettings, manifest: Layout | None) -> list[str]:
    sources = layer_sources(manifest) if manifest is not None else None
    keys = []
    for (index, name), _linear in _chosen_linears(model, settings.modules):
        keys.append(f"L{sources[index] if sources is not None else index}.{name}")
        mark_overridden(manifest, index, name)
    return keys
