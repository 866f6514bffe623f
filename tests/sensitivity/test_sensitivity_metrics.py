import math

import numpy as np
import pytest
import torch
from torch import nn

from agent_prune.sensitivity import metrics
from agent_prune.sensitivity.collectors import ChannelCollector, HeadCollector, LinearCollector


def test_wanda_score_of_a_small_linear_equals_the_hand_formula():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]))
    # two samples of two tokens each
    x = torch.tensor([[[1.0, 0.0, 2.0], [1.0, 1.0, 0.0]], [[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]])
    collector = LinearCollector(layer)
    handle = layer.register_forward_hook(collector.hook)
    layer(x[:1])
    layer(x[1:])
    handle.remove()
    # ||X_j||^2 = sum over tokens of x_j^2, averaged over the 2 samples (Wanda's scaler_row)
    norms = [math.sqrt((1 + 1 + 4 + 0) / 2), math.sqrt((0 + 1 + 1 + 1) / 2), math.sqrt((4 + 0 + 0 + 4) / 2)]
    by_hand = [[abs(w) * n for w, n in zip(row, norms)] for row in layer.weight.tolist()]
    assert collector.finalize().reshape(-1).tolist() == pytest.approx([v for row in by_hand for v in row])
    nonzero = sorted(v for row, wrow in zip(by_hand, layer.weight.tolist()) for v, w in zip(row, wrow) if w)
    scores = collector.finalize()[layer.weight != 0]
    assert metrics.percentile(scores, 10) == pytest.approx(float(np.percentile(nonzero, 10)))


@pytest.mark.parametrize("q", [0, 10, 37.5, 50, 100])
def test_percentile_matches_numpy_with_ties(q):
    values = torch.tensor([3.0, 1.0, 1.0, 1.0, 7.0, 2.0, 9.0, 2.0, 5.0, 5.0, 4.0])
    assert metrics.percentile(values, q) == pytest.approx(float(np.percentile(values.numpy(), q)))
    big = torch.randn(10_001)
    assert metrics.percentile(big, q) == pytest.approx(float(np.percentile(big.numpy(), q)), rel=1e-6)


def test_zscores_have_mean_zero_and_std_one():
    values = [0.3, 1.7, -2.0, 5.5, 0.0, 0.9]
    z = metrics.zscores(values)
    assert np.mean(z) == pytest.approx(0.0, abs=1e-12)
    assert np.std(z) == pytest.approx(1.0, abs=1e-6)
    assert metrics.zscores([2.0, 2.0]) == [0.0, 0.0]
    assert metrics.zscores([1.0, None, 3.0]) == pytest.approx([-1.0, None, 1.0], abs=1e-6)
    assert metrics.zscores([None, None]) == [None, None]


def test_head_score_is_the_l1_norm_of_each_head_projected_through_o_proj():
    torch.manual_seed(0)
    o_proj = nn.Linear(6, 4, bias=False)  # 3 heads of dim 2
    z = torch.randn(1, 5, 6)
    collector = HeadCollector(o_proj, head_dim=2)
    collector.add_batch(z, o_proj(z))
    w = o_proj.weight.detach()
    by_hand = [
        sum(float((w[:, 2 * h : 2 * h + 2] @ z[0, t, 2 * h : 2 * h + 2]).abs().sum()) for t in range(5)) / 5
        for h in range(3)
    ]
    assert collector.head_scores().tolist() == pytest.approx(by_hand, rel=1e-5)
    assert metrics.kv_group_scores(torch.tensor([*by_hand, 1.0]), 2).tolist() == pytest.approx(
        [by_hand[0] + by_hand[1], by_hand[2] + 1.0], rel=1e-6)


def test_channel_score_and_spike_trace_of_down_proj():
    torch.manual_seed(0)
    down = nn.Linear(5, 3, bias=False)
    with torch.no_grad():
        down.weight.mul_(0.1)
        down.weight[1, 3] = 40.0
    a = torch.randn(2, 4, 5)
    a[1, 2, 3] = 10.0  # the token where channel 3 meets the planted weight
    collector = ChannelCollector(down)
    with torch.no_grad():
        y = down(a)
    collector.add_batch(a, y)
    residual = torch.zeros(2, 4, 3)
    collector.observe_layer(residual, residual + y)  # the spike creates a large residual value
    by_hand = a.reshape(-1, 5).abs().mean(0) * down.weight.detach().abs().sum(0)
    assert collector.channel_scores().tolist() == pytest.approx(by_hand.tolist(), rel=1e-5)
    spikes = collector.spikes(ratio=5.0, min_output=1.0)
    assert [(s.row, s.column) for s in spikes] == [(1, 3)]
    assert spikes[0].input == pytest.approx(10.0)
    assert spikes[0].weight == pytest.approx(40.0)
    assert spikes[0].residual_out == pytest.approx(float(y[1, 2, 1]))
    cancelling = ChannelCollector(down)
    cancelling.add_batch(a, y)
    cancelling.observe_layer(residual - y, residual)  # the same spike cancelling a residual value
    assert cancelling.spikes(ratio=5.0, min_output=1.0) == []


def test_taylor_structures_sum_the_weights_each_structure_owns():
    heads, kv, d, hidden, inter = 4, 2, 2, 3, 5
    t = {
        "q_proj": torch.rand(heads * d, hidden), "k_proj": torch.rand(kv * d, hidden),
        "v_proj": torch.rand(kv * d, hidden), "o_proj": torch.rand(hidden, heads * d),
        "gate_proj": torch.rand(inter, hidden), "up_proj": torch.rand(inter, hidden),
        "down_proj": torch.rand(hidden, inter),
    }
    s = metrics.taylor_structures({name: metrics.owned_sums(name, v) for name, v in t.items()}, kv, d)
    head1 = t["q_proj"][2:4].sum() + t["o_proj"][:, 2:4].sum()
    assert float(s["heads"][1]) == pytest.approx(float(head1))
    group1 = s["heads"][2] + s["heads"][3] + t["k_proj"][2:4].sum() + t["v_proj"][2:4].sum()
    assert float(s["kv_groups"][1]) == pytest.approx(float(group1))
    ch4 = t["gate_proj"][4].sum() + t["up_proj"][4].sum() + t["down_proj"][:, 4].sum()
    assert float(s["mlp_channels"][4]) == pytest.approx(float(ch4))


def test_depth_metrics_of_known_vectors():
    x_in = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    x_out = torch.tensor([[[0.0, 1.0], [2.0, 2.0]]])
    cos = metrics.token_cosine(x_in, x_out)
    assert cos[0].tolist() == pytest.approx([0.0, 1.0], abs=1e-6)
    assert metrics.angular_distance(cos)[0].tolist() == pytest.approx([0.5, 0.0], abs=1e-3)


def test_l2_structure_scores_are_what_each_structure_writes_to_the_output():
    torch.manual_seed(0)
    acts = torch.randn(50, 6)
    weight = torch.randn(4, 6)
    channels = metrics.column_l2_scores(acts.pow(2).sum(0).double(), weight)
    expected = torch.stack([acts[:, j].norm() * weight[:, j].norm() for j in range(6)])
    torch.testing.assert_close(channels, expected)
    # 3 heads of head_dim 2 over the same columns; 1 KV group serves heads 0-2
    structures = metrics.l2_structures(channels, acts.pow(2).sum(0).double(), weight, 1, 2)
    heads = torch.stack([channels[2 * h: 2 * h + 2].pow(2).sum().sqrt() for h in range(3)])
    torch.testing.assert_close(structures["heads"], heads)
    torch.testing.assert_close(structures["kv_groups"], heads.sum().reshape(1))


def test_fluctuation_is_input_variance_times_squared_column_norm():
    torch.manual_seed(0)
    acts = torch.randn(64, 5).double()
    acts[:, 2] = 3.0  # a constant channel: all of it is mean, nothing fluctuates
    weight = torch.randn(4, 5)
    scores = metrics.column_fluctuation_scores(acts.sum(0), acts.pow(2).sum(0), 64, weight)
    expected = acts.var(dim=0, unbiased=False) * weight.double().pow(2).sum(0)
    torch.testing.assert_close(scores, expected.float())
    assert float(scores[2]) == pytest.approx(0.0, abs=1e-5)


def test_obs_saliency_is_the_error_left_after_refitting_the_other_columns():
    torch.manual_seed(0)
    x = torch.randn(400, 6, dtype=torch.float64)
    x[:, 1] += 0.9 * x[:, 0]  # correlated columns: one can stand in for the other
    weight = torch.randn(3, 6, dtype=torch.float64)
    target = x @ weight.T
    xtx = x.T @ x

    def refit_error(removed: list[int]) -> float:
        kept = [j for j in range(6) if j not in removed]
        solution = torch.linalg.lstsq(x[:, kept], target).solution
        return float((x[:, kept] @ solution - target).pow(2).sum())

    columns = metrics.obs_group_scores(xtx, weight, 1, damping=0.0)
    assert columns.tolist() == pytest.approx([refit_error([j]) for j in range(6)], rel=1e-4)
    pairs = metrics.obs_group_scores(xtx, weight, 2, damping=0.0)
    assert pairs.tolist() == pytest.approx([refit_error([2 * b, 2 * b + 1]) for b in range(3)], rel=1e-4)


def test_obs_with_uncorrelated_inputs_ranks_as_the_l2_score():
    torch.manual_seed(0)
    scale = torch.tensor([1.0, 3.0, 0.5, 2.0])
    x = torch.randn(20000, 4, dtype=torch.float64)
    x = torch.linalg.qr(x).Q * 100 * scale.double()  # exactly orthogonal columns of set norms
    weight = torch.randn(2, 4)
    obs = metrics.obs_group_scores(x.T @ x, weight, 1, damping=0.5)
    l2 = metrics.column_l2_scores(x.pow(2).sum(0), weight)
    torch.testing.assert_close(obs, 1.5 * l2.pow(2), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("width", [7, 256, 300, 700])
def test_gram_is_the_whole_product_from_its_upper_blocks(width):
    x = torch.randn(96, width, generator=torch.Generator().manual_seed(width))
    product = metrics.gram(x)
    assert torch.allclose(product, x.T @ x, rtol=1e-5, atol=1e-4)
    block = metrics.GRAM_BLOCK
    if width > block:  # below the first block: mirrored, not multiplied
        assert torch.equal(product[block:, :block], product[:block, block:].T)
