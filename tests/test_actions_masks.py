import pytest
import torch

from agent_prune.actions import apply_actions, dense_manifest
from agent_prune.actions.masks import is_n_m, n_m_keep_mask, unstructured_keep_mask
from agent_prune.models.accounting import count_parameters
from agent_prune.models.adapters import adapter_for
from tests.conftest import tiny_model


def layer_linears(model, layer):
    adapter = adapter_for(model)
    return adapter.linear_modules(adapter.layers()[layer])


@pytest.mark.parametrize(("pattern", "n", "m"), [("2:4", 2, 4), ("4:8", 4, 8)])
def test_n_m_mask_is_exact_in_every_group(family, pattern, n, m):
    model = tiny_model(family)
    before = count_parameters(model)
    manifest = apply_actions(model, [{"kind": "mask_sparsity", "layer": 1, "pattern": pattern}],
                             dense_manifest(model))
    for name, linear in layer_linears(model, 1).items():
        rows, cols = linear.weight.shape
        nonzero = (linear.weight != 0).reshape(rows, cols // m, m).sum(2)
        assert torch.equal(nonzero, torch.full_like(nonzero, n)), name  # exactly N kept per group
    after = count_parameters(model)
    assert (after.total, after.prunable) == (before.total, before.prunable)  # nothing got smaller
    assert after.mask_sparsity == pytest.approx(0.5 / 4)  # one layer of four at 50%
    assert manifest.actions[0].effect.startswith("no size or speed change")
    assert not manifest.is_structural


def test_unstructured_mask_zeroes_ratio_of_each_row():
    model = tiny_model("llama")
    apply_actions(model, [{"kind": "mask_sparsity", "layer": 0, "ratio": 0.3}], dense_manifest(model))
    for linear in layer_linears(model, 0).values():
        zeros = (linear.weight == 0).sum(1)
        assert torch.equal(zeros, torch.full_like(zeros, int(linear.in_features * 0.3)))


def test_mask_keeps_the_largest_scores():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 9.0, 8.0, 0.1]])
    assert n_m_keep_mask(scores, 2, 4).tolist() == [[True, False, True, False, False, True, True, False]]
    keep = unstructured_keep_mask(scores, 0.5, exempt=torch.tensor([[False] * 7 + [True]]))
    assert keep.tolist() == [[True, False, False, False, False, True, True, True]]  # 0.1 is exempt
    assert is_n_m(scores * n_m_keep_mask(scores, 2, 4), 2, 4)


def test_input_norms_steer_the_mask_like_wanda():
    model = tiny_model("llama")
    hidden = model.config.hidden_size
    norms = torch.ones(hidden)
    norms[:8] = 1e6  # features 0-7 carry huge activations: their weights must survive
    apply_actions(model, [{"kind": "mask_sparsity", "layer": 0, "ratio": 0.5}], dense_manifest(model),
                  input_norms={0: {"mlp.gate_proj": norms}})
    linears = layer_linears(model, 0)
    assert bool((linears["mlp.gate_proj"].weight[:, :8] != 0).all())
    assert not bool((linears["mlp.up_proj"].weight[:, :8] != 0).all())  # no norms there: magnitude only


def test_unstructured_mask_spares_protected_structures():
    model = tiny_model("llama")
    original = layer_linears(model, 2)["mlp.down_proj"].weight[:, 7].clone()
    protected = [{"layer": 2, "kind": "mlp_channel", "index": 7}]
    manifest = apply_actions(model, [{"kind": "mask_sparsity", "layer": 2, "ratio": 0.9}],
                             dense_manifest(model), protected=protected)
    linears = layer_linears(model, 2)
    assert torch.equal(linears["mlp.down_proj"].weight[:, 7], original)
    assert bool((linears["mlp.gate_proj"].weight[7] != 0).all())
    assert manifest.actions[0].score_sources == {"weights": "weight_magnitude"}
