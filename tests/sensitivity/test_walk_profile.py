"""The profile measured during a reconstruction walk is the profile of the refitted model."""

import pytest
import torch

from agent_prune.models.streaming import batch_slices
from agent_prune.recovery.reconstruct import reconstruct
from agent_prune.sensitivity import profile_model
from agent_prune.sensitivity.collectors import COLLECT_TOKENS, ChannelCollector, column_peaks
from agent_prune.sensitivity.measure import WalkProfile
from tests.conftest import tiny_model
from tests.recovery.surgery import cut_kv_group, cut_mlp, drop_layers

# gemma2 norms each block's output, so its walk takes the full second pass instead of the shortcut.
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2")


def windows(count: int = 12, seqlen: int = 48) -> torch.Tensor:
    return torch.randint(0, 256, (count, seqlen), generator=torch.Generator().manual_seed(3))


def numbers(value, path=""):
    """(path, float) pairs of a dumped profile, skipping its cost (timings differ by nature)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key != "cost":
                yield from numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from numbers(item, f"{path}[{index}]")
    else:
        yield path, value


def assert_same_profile(walked, fresh):
    a, b = dict(numbers(walked.model_dump())), dict(numbers(fresh.model_dump()))
    assert a.keys() == b.keys()
    for path, value in a.items():
        if isinstance(value, float):
            assert value == pytest.approx(b[path], rel=1e-3, abs=1e-6), path
        else:
            assert value == b[path], path


@pytest.mark.parametrize("family", FAMILIES)
def test_walk_profile_equals_a_fresh_profile_of_the_refitted_model(family):
    dense = tiny_model(family)
    pruned = cut_mlp(dense, 40)
    if family == "qwen2":  # an attention refit too: the MLP's pass then sees the new o_proj
        pruned = cut_kv_group(pruned, [1])
    calibration = windows()
    walk = WalkProfile(pruned, calibration, list(range(4)), dataset="c4", seed=0)
    before = [p.clone() for p in pruned.parameters()]
    reconstruct(pruned, dense, range(4), calibration, measure=walk)
    assert any(not torch.equal(a, b) for a, b in zip(before, pruned.parameters())), "nothing was refitted"
    walked = walk.profile()
    fresh = profile_model(pruned, calibration, gradients=False, dataset="c4", seed=0)
    assert walked.cost.measured_in == "reconstruction" and fresh.cost.measured_in == "profile"
    assert_same_profile(walked, fresh)


def test_walk_profile_carries_the_structured_obs_scores_when_hessians_are_wanted():
    dense = tiny_model("llama")
    pruned = cut_mlp(dense, 40)
    calibration = windows()
    walk = WalkProfile(pruned, calibration, list(range(4)), hessians=True)
    reconstruct(pruned, dense, range(4), calibration, measure=walk)
    fresh = profile_model(pruned, calibration, gradients=False, hessians=True)
    walked = walk.profile()
    assert walked.layers[0].structures_obs is not None
    assert_same_profile(walked, fresh)


def test_walk_measures_layers_past_the_last_refit_and_nothing_without_a_refit():
    dense = tiny_model("llama")
    pruned = cut_mlp(dense, 40, layers=[0, 1])
    calibration = windows()
    walk = WalkProfile(pruned, calibration, list(range(4)))
    reconstruct(pruned, dense, range(4), calibration, measure=walk)
    assert_same_profile(walk.profile(), profile_model(pruned, calibration, gradients=False))

    dropped, kept = drop_layers(dense, [2])  # a depth cut alone: no refit, so no walk
    walk = WalkProfile(dropped, calibration, kept)
    reconstruct(dropped, dense, kept, calibration, measure=walk)
    assert walk.profile() is None


def test_collectors_take_a_large_batch_as_successive_chunks_of_1024_tokens():
    """A refit pass hands the collectors 8 windows at once; they sum it in the profile's chunks."""
    torch.manual_seed(0)
    module = torch.nn.Linear(24, 8)
    x = torch.randn(4, 700, 24) * torch.linspace(0.1, 3.0, 24)
    y = module(x).detach()
    whole, chunked = ChannelCollector(module), ChannelCollector(module)
    whole.add_batch(x, y)
    flat_x, flat_y = x.reshape(-1, 24), y.reshape(-1, 8)
    for rows in batch_slices(flat_x.shape[0], COLLECT_TOKENS):  # 1024, 1024, 752 tokens
        chunked.add_batch(flat_x[rows], flat_y[rows])
    for name in ("sum_squares", "sums", "abs_sum", "out_max", "out_column", "out_input"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name
    assert whole.tokens == chunked.tokens == 2800
    peak, token = column_peaks(flat_y)
    assert torch.equal(peak, flat_y.abs().max(dim=0).values)
    assert torch.equal(flat_y.abs()[token, torch.arange(8)], peak)
