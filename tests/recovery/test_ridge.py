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
