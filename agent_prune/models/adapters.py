"""Model-family adapters: the one place that knows where a decoder family keeps its parts.

Pruners, collectors and exporters ask an adapter for "the layers", "the query projection of layer
i" or "the per-layer config lists"; nothing else in the package names ``model.model.layers`` or a
projection attribute. A family that follows the common Hugging Face decoder layout (Llama, Mistral,
Qwen2, Qwen3, Gemma) needs only a subclass stating how it differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from agent_prune.errors import UnsupportedModelError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LayerWidths:
    """The prunable widths of one decoder layer, read from its tensors (not from the config)."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0


class FamilyAdapter:
    """Where a Hugging Face decoder-only family keeps its layers, projections and per-layer config."""

    model_types: ClassVar[tuple[str, ...]] = ()
    # Config attributes holding one entry per decoder layer: sliced when layers are removed.
    per_layer_config_lists: ClassVar[tuple[str, ...]] = ("layer_types",)
    attention_attr: ClassVar[str] = "self_attn"
    # Dotted path of the decoder-layer list inside the *ForCausalLM model (for generated code).
    layers_path: ClassVar[str] = "model.layers"
    mlp_attr: ClassVar[str] = "mlp"
    # Config flags that give the stock layer biases, and the part of the layer each switches on
    # ("attention_bias": "self_attn."): an export whose biases they cover keeps a stock config.
    # Only where serving engines read the same flags (vLLM's Llama does), else the export carries
    # modeling code for its biases.
    bias_flags: ClassVar[dict[str, str]] = {}

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # ---- whole model -------------------------------------------------------------------------
    def backbone(self) -> nn.Module:
        return self.model.model

    def layers(self) -> nn.ModuleList:
        return self.backbone().layers

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    def embed_tokens(self) -> nn.Module:
        return self.backbone().embed_tokens

    def rotary_embedding(self) -> nn.Module:
        return self.backbone().rotary_emb

    def final_norm(self) -> nn.Module:
        return self.backbone().norm

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def output_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits from the last decoder layer's output: final norm, lm_head, final soft-capping."""
        logits = self.lm_head()(self.final_norm()(hidden_states))
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @property
    def head_dim(self) -> int:
        head_dim = getattr(self.config, "head_dim", None)
        return head_dim or self.config.hidden_size // self.config.num_attention_heads

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def layer_key_prefix(self, index: int) -> str:
        """State-dict prefix of decoder layer ``index`` (e.g. ``model.layers.3.``)."""
        return f"{self.layers_path}.{index}."

    # ---- one layer ---------------------------------------------------------------------------
    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attention_attr)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp_attr)

    def attention_projections(self, layer: nn.Module) -> dict[str, nn.Linear]:
        attn = self.attention(layer)
        return {name: getattr(attn, name) for name in ATTENTION_PROJECTIONS}

    def mlp_projections(self, layer: nn.Module) -> dict[str, nn.Linear]:
        mlp = self.mlp(layer)
        return {name: getattr(mlp, name) for name in MLP_PROJECTIONS}

    def linear_modules(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The layer's prunable linears, keyed by their name relative to the layer."""
        modules = {f"{self.attention_attr}.{k}": v for k, v in self.attention_projections(layer).items()}
        modules |= {f"{self.mlp_attr}.{k}": v for k, v in self.mlp_projections(layer).items()}
        return modules

    def layer_widths(self, layer: nn.Module) -> LayerWidths:
        proj = self.attention_projections(layer)
        return LayerWidths(
            num_heads=proj["q_proj"].out_features // self.head_dim,
            num_kv_heads=proj["k_proj"].out_features // self.head_dim,
            intermediate_size=self.mlp_projections(layer)["gate_proj"].out_features,
        )

    def projections_feed_residual(self, layer: nn.Module) -> bool:
        """Whether o_proj/down_proj outputs are added to the residual stream as they are (no norm
        after them), so a refit can aim at the dense residual stream directly."""
        return True

    def set_attention_heads(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        """Tell an attention module its new head counts after its projections were resized.

        Attention reshapes with ``(..., -1, head_dim)``, so only the GQA repeat factor and any
        cached head counts need updating; head_dim (and so RoPE and q/k norms) never changes.
        """
        attn = self.attention(layer)
        attn.num_key_value_groups = num_heads // num_kv_heads
        for attr, value in (("num_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
            if hasattr(attn, attr):
                setattr(attn, attr, value)

    # ---- structure edits ---------------------------------------------------------------------
    def keep_layers(self, indices: list[int]) -> None:
        """Keep only the decoder layers at ``indices`` (in that order), renumber, update config."""
        old = self.layers()
        self.backbone().layers = nn.ModuleList([old[i] for i in indices])
        for name in self.per_layer_config_lists:
            values = getattr(self.config, name, None)
            if isinstance(values, (list, tuple)) and len(values) == len(old):
                setattr(self.config, name, [values[i] for i in indices])
        self.config.num_hidden_layers = len(indices)
        self.renumber_layers()

    def renumber_layers(self) -> None:
        """Give every attention module its position: the KV cache is indexed by ``layer_idx``."""
        for index, layer in enumerate(self.layers()):
            attn = self.attention(layer)
            attn.layer_idx = index
            if hasattr(layer, "layer_idx"):
                layer.layer_idx = index


class LlamaAdapter(FamilyAdapter):
    """Llama and Llama-shaped models (SmolLM2, TinyLlama, ...)."""

    model_types = ("llama",)
    bias_flags: ClassVar[dict[str, str]] = {"attention_bias": "self_attn.", "mlp_bias": "mlp."}


class MistralAdapter(FamilyAdapter):
    model_types = ("mistral",)


class Qwen2Adapter(FamilyAdapter):
    """Qwen2: q/k/v carry biases (sliced with their rows); ``max_window_layers`` counts layers."""

    model_types = ("qwen2",)

    def keep_layers(self, indices: list[int]) -> None:
        super().keep_layers(indices)
        if getattr(self.config, "max_window_layers", None) is not None:
            self.config.max_window_layers = min(self.config.max_window_layers, len(indices))


class Qwen3Adapter(Qwen2Adapter):
    """Qwen3: per-head q_norm/k_norm act on head_dim, so removing whole heads keeps them valid."""

    model_types = ("qwen3",)


class GemmaAdapter(FamilyAdapter):
    """Gemma 1/2/3 text models share the Llama layout (extra norms are per-hidden, not pruned)."""

    model_types = ("gemma", "gemma2", "gemma3_text")

    def projections_feed_residual(self, layer: nn.Module) -> bool:
        return not hasattr(layer, "post_feedforward_layernorm")  # Gemma 2/3 norm after each block


ADAPTERS: tuple[type[FamilyAdapter], ...] = (
    LlamaAdapter,
    MistralAdapter,
    Qwen2Adapter,
    Qwen3Adapter,
    GemmaAdapter,
)


def supported_model_types() -> list[str]:
    return [t for cls in ADAPTERS for t in cls.model_types]


def adapter_class_for(model_type: str) -> type[FamilyAdapter]:
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls
    raise UnsupportedModelError(
        f"model type '{model_type}' is not supported",
        f"supported decoder families: {', '.join(supported_model_types())}",
    )


def adapter_for(model: nn.Module) -> FamilyAdapter:
    return adapter_class_for(model.config.model_type)(model)
