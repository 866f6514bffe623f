"""The layer-streamed profile equals a plain full-model computation with hooks, on tiny models."""

import math

import numpy as np
import pytest
import torch

from agent_prune.errors import InputError
from agent_prune.models.adapters import adapter_for
from agent_prune.sensitivity import ActivationStore, metrics, profile_model
from tests.conftest import tiny_model

SAMPLES, SEQLEN = 6, 24


def windows(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (SAMPLES, SEQLEN), generator=torch.Generator().manual_seed(seed))


def reference(model, ids):
    """Whole-model forward + backward with hooks: the straightforward (memory-hungry) way."""
    adapter = adapter_for(model)
    inputs, last_out = {}, []
    hooks = []
    for i, layer in enumerate(adapter.layers()):
        for name, module in adapter.linear_modules(layer).items():
            hooks.append(module.register_forward_hook(
                lambda m, a, o, key=(i, name): inputs.__setitem__(key, a[0].detach())))
    hooks.append(adapter.layers()[-1].register_forward_hook(lambda m, a, o: last_out.append(o.detach())))
    out = model(ids, labels=ids, output_hidden_states=True)
    out.loss.backward()
    for h in hooks:
        h.remove()
    states = [s.detach() for s in (*out.hidden_states[:-1], last_out[0])]  # [-1] is after the final norm
    return inputs, states, float(out.loss.detach())


def test_streaming_profile_equals_full_model_hooked_results(family):
    model = tiny_model(family)
    ids = windows()
    profile = profile_model(model, ids, batch_size=4)  # 6 samples: batches of 4 and 2
    inputs, states, loss = reference(model, ids)
    adapter = adapter_for(model)
    assert profile.calibration_loss == pytest.approx(loss, rel=1e-5)
    for i, layer in enumerate(adapter.layers()):
        entry = profile.layers[i]
        cos = torch.nn.functional.cosine_similarity(states[i], states[i + 1], dim=-1)
        assert entry.block_influence == pytest.approx(1 - float(cos.mean()), rel=1e-4, abs=1e-6)
        angular = (torch.arccos(cos[:, -1].clamp(-1, 1)) / math.pi).mean()
        assert entry.angular_distance == pytest.approx(float(angular), rel=1e-4, abs=1e-6)
        all_scores, all_grads = [], []
        for name, module in adapter.linear_modules(layer).items():
            x = inputs[(i, name)]
            norm = (x.pow(2).sum(dim=(0, 1)) / SAMPLES).sqrt()
            scores = (module.weight.abs() * norm).detach().reshape(-1)
            grad = module.weight.grad
            stats = entry.modules[name]
            assert stats.wanda == pytest.approx(float(scores.mean()), rel=1e-4)
            assert stats.wanda_p10 == pytest.approx(float(np.percentile(scores.numpy(), 10)), rel=1e-4)
            assert stats.gradient == pytest.approx(float(grad.abs().mean()), rel=1e-3)
            taylor = float((module.weight.detach() * grad).abs().mean())
            assert stats.taylor == pytest.approx(taylor, rel=1e-3)
            all_scores.append(scores)
            all_grads.append(grad.abs().reshape(-1))
        layer_p10 = float(np.percentile(torch.cat(all_scores).numpy(), 10))
        assert entry.wanda_p10 == pytest.approx(layer_p10, rel=1e-4)
        assert entry.gradient == pytest.approx(float(torch.cat(all_grads).mean()), rel=1e-3)
        o_proj = adapter.attention_projections(layer)["o_proj"].weight.detach()
        z = inputs[(i, "self_attn.o_proj")].reshape(-1, entry.num_heads, 16)
        heads = [float((z[:, h] @ o_proj[:, 16 * h : 16 * h + 16].T).abs().sum(-1).mean())
                 for h in range(entry.num_heads)]
        assert entry.structures.heads == pytest.approx(heads, rel=1e-4)
        down = adapter.mlp_projections(layer)["down_proj"].weight.detach()
        a = inputs[(i, "mlp.down_proj")].reshape(-1, down.shape[1])
        channels = a.abs().mean(0) * down.abs().sum(0)
        assert entry.structures.mlp_channels == pytest.approx(channels.tolist(), rel=1e-4)


def test_fluctuation_obs_and_means_equal_the_hooked_inputs(tiny_llama):
    ids = windows()
    profile = profile_model(tiny_llama, ids, batch_size=4, gradients=False, hessians=True)
    inputs, _, _ = reference(tiny_llama, ids)
    adapter = adapter_for(tiny_llama)
    for i, layer in enumerate(adapter.layers()):
        entry = profile.layers[i]
        o_proj = adapter.attention_projections(layer)["o_proj"].weight.detach()
        down = adapter.mlp_projections(layer)["down_proj"].weight.detach()
        z = inputs[(i, "self_attn.o_proj")].reshape(-1, o_proj.shape[1]).double()
        a = inputs[(i, "mlp.down_proj")].reshape(-1, down.shape[1]).double()
        assert entry.input_means.down_proj == pytest.approx(a.mean(0).tolist(), rel=1e-4, abs=1e-6)
        assert entry.input_means.o_proj == pytest.approx(z.mean(0).tolist(), rel=1e-4, abs=1e-6)
        channels = a.var(0, unbiased=False) * down.double().pow(2).sum(0)
        assert entry.structures_fluctuation.mlp_channels == pytest.approx(channels.tolist(), rel=1e-3)
        columns = z.var(0, unbiased=False) * o_proj.double().pow(2).sum(0)
        heads = columns.reshape(-1, 16).sum(1)
        assert entry.structures_fluctuation.heads == pytest.approx(heads.tolist(), rel=1e-3)
        obs = metrics.obs_group_scores(a.T @ a, down, 1, metrics.OBS_DAMPING)
        assert entry.structures_obs.mlp_channels == pytest.approx(obs.tolist(), rel=1e-3)
        kv = metrics.obs_group_scores(z.T @ z, o_proj, 32, metrics.OBS_DAMPING)  # 2 heads of 16 a group
        assert entry.structures_obs.kv_groups == pytest.approx(kv.tolist(), rel=1e-3)
    assert profile_model(tiny_llama, ids, gradients=False).layers[0].structures_obs is None


def test_profiling_leaves_the_model_as_it_was(tiny_llama):
    tiny_llama.train()
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    flags = [p.requires_grad for p in tiny_llama.parameters()]
    profile_model(tiny_llama, windows(), batch_size=3)
    assert tiny_llama.training
    assert [p.requires_grad for p in tiny_llama.parameters()] == flags
    assert all(p.grad is None for p in tiny_llama.parameters())
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())
    assert len(adapter_for(tiny_llama).layers()) == 4


def test_results_do_not_depend_on_batch_size_or_activation_store(tiny_llama):
    ids = windows()
    a = profile_model(tiny_llama, ids, batch_size=1, activation_store="memory")
    b = profile_model(tiny_llama, ids, batch_size=6, activation_store="disk")
    for la, lb in zip(a.layers, b.layers):
        for metric in ("block_influence", "wanda", "wanda_p10", "gradient", "taylor"):
            assert getattr(la, metric) == pytest.approx(getattr(lb, metric), rel=1e-4)
        assert la.structures.heads == pytest.approx(lb.structures.heads, rel=1e-4)


def test_without_gradients_only_gradient_fields_are_empty(tiny_llama):
    profile = profile_model(tiny_llama, windows(), gradients=False)
    layer = profile.layers[0]
    assert layer.gradient is None and layer.taylor is None and layer.structures_taylor is None
    assert layer.z["gradient"] is None and layer.z["wanda"] is not None
    assert profile.calibration_loss is None
    assert len(layer.structures.mlp_channels) == 96


def _changed_from_layer_2(model):
    with torch.no_grad():
        adapter_for(model).layers()[2].mlp.down_proj.weight.mul_(0.5)


@pytest.mark.parametrize("persistent", [False, True])
def test_partial_profile_after_a_width_change_equals_a_full_one(persistent):
    model = tiny_model("llama")
    ids = windows()
    store = ActivationStore("memory") if persistent else None
    before = profile_model(model, ids, store=store, batch_size=4)
    _changed_from_layer_2(model)
    calls = []
    hook = adapter_for(model).layers()[0].register_forward_hook(lambda *a: calls.append(1))
    partial = profile_model(model, ids, previous=before, start_layer="auto", store=store, batch_size=4)
    hook.remove()
    assert partial.cost.start_layer == 2
    full = profile_model(model, ids)
    # with a persistent store neither layer 0 nor 1 runs forward again (the backward re-runs them)
    forward_calls = 0 if persistent else 2
    assert len(calls) == forward_calls + 2  # 2 batches (4 + 2 samples), recomputed by the backward
    assert [layer.reused for layer in partial.layers] == [True, True, False, False]
    for p, f in zip(partial.layers, full.layers):
        for metric in ("block_influence", "wanda", "wanda_p10", "gradient", "taylor"):
            assert getattr(p, metric) == pytest.approx(getattr(f, metric), rel=1e-5)
            assert p.z[metric] == pytest.approx(f.z[metric], rel=1e-4, abs=1e-6)
    assert partial.layers[0].gradient != before.layers[0].gradient  # gradients are always recomputed
    if store is not None:
        store.close()


def test_partial_profile_after_a_depth_cut_uses_current_indices_and_sources():
    model = tiny_model("llama")
    ids = windows()
    before = profile_model(model, ids)
    adapter_for(model).keep_layers([0, 2, 3])
    partial = profile_model(model, ids, previous=before, start_layer="auto", layer_sources=[0, 2, 3])
    assert partial.cost.start_layer == 1
    full = profile_model(model, ids, layer_sources=[0, 2, 3])
    assert [layer.index for layer in partial.layers] == [0, 1, 2]
    assert [layer.source for layer in partial.layers] == [0, 2, 3]
    for p, f in zip(partial.layers, full.layers):
        assert p.block_influence == pytest.approx(f.block_influence, rel=1e-5)
        assert p.gradient == pytest.approx(f.gradient, rel=1e-5)


def test_a_shared_store_never_serves_activations_of_another_model():
    model, ids = tiny_model("llama"), windows()
    with ActivationStore("memory") as store:
        before = profile_model(model, ids, store=store)
        candidate = tiny_model("llama")
        with torch.no_grad():
            adapter_for(candidate).layers()[1].mlp.up_proj.weight.mul_(2.0)
        profile_model(candidate, ids, store=store)  # overwrites entries 0..3 with its activations
        _changed_from_layer_2(model)
        partial = profile_model(model, ids, previous=before, start_layer=2, store=store)
    full = profile_model(model, ids)
    for p, f in zip(partial.layers, full.layers):
        assert p.block_influence == pytest.approx(f.block_influence, rel=1e-5)
        assert p.wanda == pytest.approx(f.wanda, rel=1e-5)
        assert p.gradient == pytest.approx(f.gradient, rel=1e-5)


def test_bad_inputs_are_one_line_errors(tiny_llama):
    ids = windows()
    with pytest.raises(InputError, match="integer tensor"):
        profile_model(tiny_llama, ids.float())
    with pytest.raises(InputError, match="vocabulary"):
        profile_model(tiny_llama, ids + 1000)
    with pytest.raises(InputError, match="layer_sources"):
        profile_model(tiny_llama, ids, layer_sources=[0, 1])
    with pytest.raises(InputError, match="previous profile"):
        profile_model(tiny_llama, ids, start_layer=1)
    before = profile_model(tiny_llama, ids, gradients=False)
    with pytest.raises(InputError, match="other calibration windows"):
        profile_model(tiny_llama, windows(seed=2), previous=before, start_layer=1)
    with pytest.raises(InputError, match="changed since the previous profile"):
        profile_model(tiny_llama, ids, previous=before, start_layer=2, layer_sources=[0, 5, 6, 7])
    with torch.no_grad():
        adapter_for(tiny_llama).layers()[0].mlp.up_proj.weight[3, 5] = 0.0  # one masked weight
    with pytest.raises(InputError, match="changed since the previous profile"):
        profile_model(tiny_llama, ids, previous=before, start_layer=2)
    assert profile_model(tiny_llama, ids, previous=before, start_layer="auto").cost.start_layer == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_weights_stay_on_cpu_while_layers_run_on_cuda(tiny_llama):
    ids = windows()
    on_cpu = profile_model(tiny_llama, ids)
    on_gpu = profile_model(tiny_llama, ids, device="cuda")
    assert next(tiny_llama.parameters()).device.type == "cpu"
    for a, b in zip(on_cpu.layers, on_gpu.layers):
        assert a.wanda == pytest.approx(b.wanda, rel=1e-3)
        assert a.gradient == pytest.approx(b.gradient, rel=1e-3)


def test_statistics_describe_only_the_weights_that_remain(tiny_llama):
    q_proj = adapter_for(tiny_llama).layers()[0].self_attn.q_proj
    with torch.no_grad():
        q_proj.weight[:16] = 0  # a masked head
    ids = windows()
    profile = profile_model(tiny_llama, ids)
    inputs, _, _ = reference(tiny_llama, ids)
    stats = profile.layers[0].modules["self_attn.q_proj"]
    assert (stats.params, stats.nonzero) == (64 * 64, 48 * 64)
    norm = (inputs[(0, "self_attn.q_proj")].pow(2).sum(dim=(0, 1)) / SAMPLES).sqrt()
    kept = (q_proj.weight[16:].abs() * norm).detach()
    assert stats.wanda == pytest.approx(float(kept.mean()), rel=1e-4)
    assert stats.wanda_p10 == pytest.approx(float(np.percentile(kept.numpy(), 10)), rel=1e-4)
    assert stats.gradient == pytest.approx(float(q_proj.weight.grad[16:].abs().mean()), rel=1e-3)
    assert profile.layers[0].nonzero == profile.layers[0].params - 16 * 64
