"""Bias compensation: a cut block's output, averaged over the calibration tokens, is what the block
gave before the cut (exact up to float rounding), in every family."""

import copy

import pytest
import torch

from agent_prune.actions import PruneWidth, apply_actions, dense_manifest
from agent_prune.models.adapters import adapter_for
from agent_prune.recovery.bias import compensate_biases
from tests.compensation import calibration_ids, compensated_cut, input_means
from tests.conftest import FAMILIES, tiny_model

# Layer 1 loses a KV group, then a query head of the group left, and 40 of 96 MLP channels.
CUT = [PruneWidth(layer=1, kv_groups=1, heads=1, mlp_channels=40)]


class Recorder:
    """The inputs and outputs of a module over every forward while active."""

    def __init__(self, module: torch.nn.Module):
        self.inputs, self.outputs = [], []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, _module, args, output):
        self.inputs.append(args[0].detach())
        self.outputs.append((output[0] if isinstance(output, tuple) else output).detach())

    def mean_output(self) -> torch.Tensor:
        outputs = torch.cat(self.outputs)
        return outputs.reshape(-1, outputs.shape[-1]).mean(dim=0)

    def remove(self) -> None:
        self.handle.remove()


def recorded(model, path: str, ids) -> Recorder:
    recorder = Recorder(adapter_for(model).layers()[1].get_submodule(path))
    with torch.no_grad():
        model(ids)
    recorder.remove()
    return recorder


def mlp_mean_output(model, inputs: list[torch.Tensor]) -> torch.Tensor:
    """Mean over all tokens of layer 1's MLP output on the given MLP inputs."""
    with torch.no_grad():
        outputs = torch.cat([adapter_for(model).layers()[1].mlp(x) for x in inputs])
    return outputs.reshape(-1, outputs.shape[-1]).mean(dim=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cut_block_keeps_its_mean_output_over_the_calibration_tokens(family):
    dense = tiny_model(family, initializer_range=0.1).double()
    ids = calibration_ids()
    dense_mlp = recorded(dense, "mlp", ids)
    dense_attention = recorded(dense, "self_attn.o_proj", ids)

    plain = copy.deepcopy(dense)
    apply_actions(plain, CUT, dense_manifest(dense))
    compensated, manifest = compensated_cut(dense, CUT, ids)

    assert manifest.overridden == ["L1.self_attn.o_proj", "L1.mlp.down_proj"]
    # Layer 0 is untouched, so layer 1's attention sees the dense inputs; its MLP is fed them here.
    expected = dense_mlp.mean_output()
    assert torch.allclose(mlp_mean_output(compensated, dense_mlp.inputs), expected, rtol=0, atol=1e-12)
    assert not torch.allclose(mlp_mean_output(plain, dense_mlp.inputs), expected, rtol=0, atol=1e-3)
    expected = dense_attention.mean_output()
    attention = recorded(compensated, "self_attn.o_proj", ids).mean_output()
    assert torch.allclose(attention, expected, rtol=0, atol=1e-12)
    uncompensated = recorded(plain, "self_attn.o_proj", ids).mean_output()
    assert not torch.allclose(uncompensated, expected, rtol=0, atol=1e-3)


def test_a_second_cut_adds_to_the_bias_of_the_first():
    """Cut twice, each time from the means of the model as it then is: the MLP still averages what
    the dense MLP did (its inputs are the dense ones, as layer 1's attention is not cut)."""
    dense = tiny_model("llama", initializer_range=0.1).double()
    ids = calibration_ids()
    dense_mlp = recorded(dense, "mlp", ids)
    once, manifest = compensated_cut(dense, [PruneWidth(layer=1, mlp_channels=30)], ids)
    first_bias = adapter_for(once).layers()[1].mlp.down_proj.bias.detach().clone()
    twice, manifest = compensated_cut(once, [PruneWidth(layer=1, mlp_channels=30)], ids, manifest)

    bias = adapter_for(twice).layers()[1].mlp.down_proj.bias
    assert bias is not None and not torch.equal(bias, first_bias)
    assert len(manifest.layers[1].mlp_channels) == 36 and manifest.overridden == ["L1.mlp.down_proj"]
    expected = dense_mlp.mean_output()
    assert torch.allclose(mlp_mean_output(twice, dense_mlp.inputs), expected, rtol=0, atol=1e-12)


def test_removed_layers_and_uncut_layers_get_no_bias():
    dense = tiny_model("qwen2")
    ids = calibration_ids()
    cut = copy.deepcopy(dense)
    old = dense_manifest(dense)
    new = apply_actions(cut, [{"kind": "remove_layers", "layers": [0]}, PruneWidth(layer=1, mlp_channels=8)],
                        old)
    changed = compensate_biases(dense, cut, old, new, input_means(dense, ids))
    assert changed == ["L2.mlp.down_proj"] == new.overridden and old.overridden == []
    layers = adapter_for(cut).layers()
    assert [layer.mlp.down_proj.bias is not None for layer in layers] == [False, True, False]
    assert all(layer.self_attn.o_proj.bias is None for layer in layers)
