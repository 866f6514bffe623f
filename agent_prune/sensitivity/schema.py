"""The ``SensitivityProfile`` record: what the planner reads and what pruners score structures by.

Plain JSON, schema-versioned, readable without this package: ``layers`` holds one object per
current decoder layer with ``index``, ``source`` (the dense model's index of that layer), the
depth metrics, Wanda and gradient statistics, their z-scores across layers (``z``) and per-
structure scores (``structures``, higher = more important, indexed by position in the current
layer). ``protected`` lists what no action may remove unless forced. ``definitions`` states every
formula in words.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent_prune.errors import InputError

SCHEMA_VERSION = 1
# pruner name -> the LayerProfile field holding its structure scores
STRUCTURE_FIELDS = {"amp": "structures", "l2": "structures_l2", "taylor": "structures_taylor",
                    "fluctuation": "structures_fluctuation", "obs": "structures_obs"}
METRICS = ("block_influence", "angular_distance", "wanda", "wanda_p10", "gradient", "taylor")

DEFINITIONS = {
    "wanda": "mean over the layer's non-zero prunable weights of S = |W_ij| * ||X_j||_2 (Wanda, "
             "arXiv 2306.11695); ||X_j||^2 = sum over a sample's tokens of x_j^2, averaged over samples",
    "wanda_p10": "10th percentile (linear interpolation) of S over the same weights (agent-guided "
                 "pruning, arXiv 2601.09694)",
    "gradient": "mean |dL/dW| over the layer's non-zero prunable weights; L = mean next-token "
                "cross-entropy over all calibration tokens, one gradient for the whole set",
    "taylor": "mean |W * dL/dW| over the same weights (first-order Taylor, LLM-Pruner arXiv 2305.11627)",
    "block_influence": "1 - mean over all calibration tokens of cos(x_in, x_out) "
                       "(ShortGPT, arXiv 2403.03853)",
    "angular_distance": "arccos(cos(x_in, x_out)) / pi of each sample's last token, averaged over "
                        "samples (Gromov et al., arXiv 2403.17887, n = 1)",
    "z": "(x - mean) / (std + 1e-8 * |mean|) of each metric across the current layers (population std)",
    "structures": "AMP (arXiv 2504.21174): heads = mean over tokens of ||W_o[:, head] z_head||_1; "
                  "mlp_channels = mean over tokens of |a_j| * ||W_down[:, j]||_1; kv_groups = sum of "
                  "the scores of the query heads a KV group serves. Higher = more important.",
    "structures_l2": "Wanda-sp with L2 norms (arXiv 2312.11983): mlp_channels = ||a_j||_2 * "
                     "||W_down[:, j]||_2 over all calibration tokens; heads = root of the summed squares "
                     "of ||x_c||_2 * ||W_o[:, c]||_2 over the head's o_proj columns; kv_groups = sum of "
                     "its heads. Higher = more important.",
    "structures_fluctuation": "FLAP's fluctuation (arXiv 2312.11983): mlp_channels = Var over calibration "
                              "tokens of a_j times ||W_down[:, j]||_2^2; heads = the same summed over the "
                              "head's o_proj columns; kv_groups = sum of its heads. Higher = more important.",
    "structures_obs": "structured OBS saliency (ZipLM arXiv 2302.04089, SlimGPT arXiv 2412.18110): the "
                      "squared output error that removing a structure's o_proj/down_proj input columns S "
                      "leaves after the best refit of the other columns, tr(W_S [H^-1]_SS^-1 W_S^T), "
                      "H = X^T X + damping * diag(X^T X); kv_groups take all their heads' columns at once",
    "input_means": "mean over calibration tokens of each input channel of o_proj and down_proj (what "
                   "bias compensation folds in for the channels a cut removes)",
    "structures_taylor": "sum of |W * dL/dW| over the weights a structure owns: head = its q_proj rows + "
                         "o_proj columns; kv_group = its heads + its k_proj/v_proj rows; mlp_channel = "
                         "its gate_proj row + up_proj row + down_proj column",
    "super_weights": "down_proj output channels whose peak |activation| is >= 50 x the layer's median "
                     "channel peak (and >= 20) and that leave the residual channel larger in magnitude "
                     "than the layer found it at that token; the weight is the down_proj entry whose "
                     "product with the input carried the spike (super weights, arXiv 2411.07191)",
}


class _Record(BaseModel):
    # protected_namespaces=(): fields named model_* (transformers' model_type) are meant; pydantic
    # < 2.10 would warn on every import otherwise
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModuleStats(_Record):
    """One linear module of a layer; statistics over its non-zero weights."""

    params: int
    nonzero: int
    wanda: float
    wanda_p10: float
    input_norm: float = Field(description="mean over input channels of ||X_j||_2")
    gradient: float | None = None
    taylor: float | None = None


class Structures(_Record):
    kv_groups: list[float]
    heads: list[float]
    mlp_channels: list[float]


class InputMeans(_Record):
    o_proj: list[float]
    down_proj: list[float]


class LayerProfile(_Record):
    index: int
    source: int
    fingerprint: str = Field(description="identity of the layer's tensors when measured")
    params: int
    nonzero: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    block_influence: float
    angular_distance: float
    wanda: float
    wanda_p10: float
    gradient: float | None = None
    taylor: float | None = None
    z: dict[str, float | None] = Field(default_factory=dict)
    modules: dict[str, ModuleStats]
    structures: Structures
    structures_l2: Structures | None = None  # absent from profiles written before it existed
    structures_taylor: Structures | None = None
    structures_fluctuation: Structures | None = None
    structures_obs: Structures | None = None  # only from profiles with hessians
    input_means: InputMeans | None = None
    reused: bool = Field(False, description="forward metrics copied from an earlier profile (partial)")


ProtectedKind = Literal["layer", "kv_group", "head", "mlp_channel"]


class ProtectedItem(_Record):
    layer: int
    kind: ProtectedKind
    index: int
    reason: str
    value: float


class SuperWeight(_Record):
    layer: int
    module: str
    row: int
    column: int
    weight: float
    output_activation: float
    input_activation: float
    ratio: float = Field(description="peak |output| over the layer's median channel peak")
    residual_in: float = Field(description="hidden state[row] entering the layer at the spike token")
    residual_out: float = Field(description="hidden state[row] leaving the layer at the spike token")


class CalibrationInfo(_Record):
    dataset: str | None = None
    samples: int
    seqlen: int
    seed: int | None = None
    tokens: int
    digest: str = Field(description="sha256 prefix of the token ids")


class ModelInfo(_Record):
    name: str | None = None
    model_type: str
    num_layers: int
    hidden_size: int
    head_dim: int
    prunable_params: int
    fingerprint: str


class ProfileCost(_Record):
    seconds: float
    forward_seconds: float
    gradient_seconds: float
    device: str
    batch_size: int
    activation_store: str
    start_layer: int
    measured_in: Literal["profile", "reconstruction"] = Field(
        "profile", description="profile: a pass of its own; reconstruction: gathered during the "
                               "candidate's refit walk on the same windows (sensitivity.measure)")


class SensitivityProfile(_Record):
    schema_version: Literal[1] = SCHEMA_VERSION
    model: ModelInfo
    calibration: CalibrationInfo
    gradients: bool
    calibration_loss: float | None = None
    layers: list[LayerProfile]
    protected: list[ProtectedItem] = Field(default_factory=list)
    super_weights: list[SuperWeight] = Field(default_factory=list)
    cost: ProfileCost
    definitions: dict[str, str] = Field(default_factory=lambda: dict(DEFINITIONS))

    # ---- reading -----------------------------------------------------------------------------
    def metric(self, name: str) -> list[float | None]:
        return [getattr(layer, name) for layer in self.layers]

    def zscore(self, name: str) -> list[float | None]:
        return [layer.z.get(name) for layer in self.layers]

    def structure_scores(
        self, method: Literal["amp", "l2", "taylor", "fluctuation", "obs"] = "amp"
    ) -> list[dict[str, list[float]]]:
        """Per current layer ``{"kv_groups", "heads", "mlp_channels"}`` score lists for pruners."""
        chosen = [getattr(layer, STRUCTURE_FIELDS[method]) for layer in self.layers]
        if any(s is None for s in chosen):
            raise InputError(f"this profile has no {method} structure scores",
                             "profile with gradients for Taylor scores, with hessians for OBS scores")
        return [s.model_dump() for s in chosen]

    def protected_sources(self) -> list[ProtectedItem]:
        """``protected`` with layer (and, for kind "layer", index) mapped to dense-model sources."""
        sources = [layer.source for layer in self.layers]
        return [
            item.model_copy(update={
                "layer": sources[item.layer],
                "index": sources[item.index] if item.kind == "layer" else item.index,
            })
            for item in self.protected
        ]

    def is_protected(self, layer: int, kind: ProtectedKind, index: int | None = None) -> bool:
        """Whether removing ``kind`` ``index`` of current layer ``layer`` would hit a protected item.

        Removing a layer hits anything protected in it; removing a KV group hits the heads it serves.
        """
        per_group = self._heads_per_group(layer)
        for item in self.protected:
            if item.layer != layer:
                continue
            if kind == "layer" or (item.kind == kind and item.index == index):
                return True
            if kind == "kv_group" and item.kind == "head" and item.index // per_group == index:
                return True
        return False

    def _heads_per_group(self, layer: int) -> int:
        entry = self.layers[layer]
        return max(entry.num_heads // max(entry.num_kv_heads, 1), 1)

    # ---- files -------------------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file in the same folder, then ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(self.to_json())
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SensitivityProfile:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read profile {path}: {exc}",
                             "pass a file written by agent-prune profile") from None
        if data.get("schema_version") != SCHEMA_VERSION:
            raise InputError(f"profile {path} has schema version {data.get('schema_version')}",
                             f"recompute it with this agent-prune (schema {SCHEMA_VERSION})")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InputError(f"profile {path} is malformed: {exc.errors()[0]['msg']}",
                             "recompute it with agent-prune profile") from None
