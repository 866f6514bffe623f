import pytest
import torch

from agent_prune.recovery.ridge import LeastSquaresCollector, solve_ridge


def test_recovers_an_exact_linear_map_from_batches():
    torch.manual_seed(0)
    weight = torch.randn(5, 8)
    x = torch.randn(3, 100, 8)
    collector = LeastSquaresCollector(8, 5)
    for part in x:  # three batches accumulate to the one-shot statistics
        collector.add_batch(part, part @ weight.T)
    assert collector.count == 300
    assert torch.allclose(collector.solve(1e-9).float(), weight, atol=1e-4)


def test_ridge_shrinks_toward_zero_and_dead_features_get_zero_weight():
    torch.manual_seed(0)
    x = torch.randn(200, 6)
    x[:, 2] = 0  # a feature that never fires
    y = x @ torch.randn(6, 3)
    xtx, xty = (x.T @ x).double(), (x.T @ y).double()
    light, heavy = solve_ridge(xtx, xty, 1e-6), solve_ridge(xtx, xty, 10.0)
    assert torch.all(light[:, 2] == 0)
    assert heavy.norm() < light.norm()


def test_ridge_pulls_toward_the_prior_and_dead_features_keep_it():
    torch.manual_seed(0)
    x = torch.randn(200, 6)
    x[:, 2] = 0  # a feature that never fires
    truth, prior = torch.randn(3, 6), torch.randn(3, 6)
    xtx, xty = (x.T @ x).double(), (x.T @ (x @ truth.T)).double()
    light = solve_ridge(xtx, xty, 1e-6, prior.double())
    heavy = solve_ridge(xtx, xty, 1e3, prior.double())
    live = [0, 1, 3, 4, 5]
    assert torch.allclose(light[:, live].float(), truth[:, live], atol=1e-3)  # the data decide
    assert torch.allclose(heavy.float(), prior, atol=1e-2)  # the prior decides
    assert torch.allclose(light[:, 2].float(), prior[:, 2])  # nothing to fit: the prior's weight


def test_an_offset_target_solves_and_scores_like_the_whole_target():
    """Targets ``x W0^T + y`` added as ``y`` with the offset ``W0`` give the whole target's solution
    (toward any prior) and the same squared errors, computed from the statistics alone."""
    torch.manual_seed(0)
    x, offset, prior = torch.randn(300, 8), torch.randn(5, 8), torch.randn(5, 8)
    y = x @ torch.randn(8, 5) * 0.1 + torch.randn(300, 5) * 0.05
    whole, part = LeastSquaresCollector(8, 5), LeastSquaresCollector(8, 5, offset=offset)
    whole.add_batch(x, x @ offset.T + y)
    part.add_batch(x, y)
    for weights in (None, prior.double(), offset.double()):
        torch.testing.assert_close(part.solve(0.3, weights), whole.solve(0.3, weights), rtol=1e-5, atol=1e-6)
    for weight in (None, prior, offset, whole.solve(0.3).float()):
        direct = float(((x @ (weight if weight is not None else torch.zeros(5, 8)).T - x @ offset.T - y)
                        .double() ** 2).sum())
        assert part.error(weight) == pytest.approx(direct, rel=1e-5)
        # Without the offset a small error is a difference of large sums: float32 batch products
        # leave it good to about 1e-5 of the target's energy.
        assert whole.error(weight) == pytest.approx(direct, rel=1e-4)
