"""Per-layer amounts of a width step: the global ranking of standardised scores and the sizing that
follows the planner's shares."""

from agent_prune.agent.allocation import global_allocation
from agent_prune.agent.candidates import LayerSize, size_mlp
from agent_prune.agent.nodes import suggested_mlp_cuts, with_suggested_shares
from agent_prune.agent.proposal import PlannerContext, WidthProposal, validate_proposal


def test_a_layer_whose_weakest_channels_sit_far_below_the_rest_gives_them_up_first():
    spread = [float(v) for v in range(10, 20)]
    skewed = [10.0] * 8 + [0.0, 0.5]  # two channels far below the layer's typical one
    assert global_allocation([spread, skewed], 2, caps=[10, 10]) == [0, 2]


def test_scale_does_not_decide_only_the_shape_does():
    layer = [1.0, 2.0, 3.0, 4.0, 10.0]
    counts = global_allocation([layer, [1000 * v for v in layer]], 4, caps=[5, 5])
    assert counts == [2, 2]


def test_a_capped_layer_passes_its_excess_on():
    tailed = [50.0] + [1.0] * 9
    counts = global_allocation([tailed, [float(v) for v in range(10)]], 8, caps=[3, 10])
    assert counts[0] == 3 and sum(counts) == 8


def sizes(channels: list[int]) -> list[LayerSize]:
    return [LayerSize(index=i, params=0, num_heads=4, num_kv_heads=2, mlp_channels=c)
            for i, c in enumerate(channels)]


def test_size_mlp_splits_the_budget_by_shares_and_places_all_of_it():
    hidden = 10  # one channel costs 30 parameters
    counts = size_mlp([0, 1, 2], sizes([100, 100, 100]), 30 * 40, hidden, shares=[3.0, 1.0, 0.0])
    assert counts == {0: 30, 1: 10}


def test_size_mlp_moves_what_a_cap_refuses_to_the_other_layers():
    counts = size_mlp([0, 1], sizes([20, 100]), 30 * 30, 10, shares=[1.0, 1.0])
    assert counts == {0: 10, 1: 20}  # layer 0 capped at half its channels


def test_even_split_without_shares_is_unchanged():
    assert size_mlp([0, 1], sizes([100, 100]), 30 * 20, 10) == {0: 10, 1: 10}


def profile(channel_scores: list[list[float]]) -> dict:
    return {"layers": [{"intermediate_size": len(s), "structures_l2": {"mlp_channels": s}}
                       for s in channel_scores]}


def test_suggestions_respect_the_step_cap_and_a_floor_of_a_third_of_the_dense_width():
    skewed = [10.0] * 10 + [0.1 * i for i in range(20)]  # 20 weak channels: the cheapest anywhere
    spread = [float(v) for v in range(30)]
    cuts = suggested_mlp_cuts(profile([skewed, spread]), budget=30 * 28, hidden=10, dense_channels=30)
    assert cuts == [15, 13]  # at most half of a layer in one step, the rest elsewhere
    thinned = suggested_mlp_cuts(profile([skewed[:12], spread]), budget=30 * 20, hidden=10, dense_channels=30)
    assert thinned[0] == 2  # 12 channels left, at least 10 of 30 stay


def test_profiles_without_l2_scores_suggest_nothing():
    no_scores = {"layers": [{"intermediate_size": 8, "structures_l2": None}]}
    assert suggested_mlp_cuts(no_scores, 300, 10, 8) == [0]


def test_planner_shares_win_and_missing_ones_come_from_the_suggestion():
    given = WidthProposal(layers=[0, 1], mlp_shares=[1.0, 2.0])
    assert with_suggested_shares(given, [5, 0]).mlp_shares == [1.0, 2.0]
    filled = with_suggested_shares(WidthProposal(layers=[1, 0], mlp_shares=[]), [5, 2])
    assert filled.mlp_shares == [2.0, 5.0]
    assert with_suggested_shares(WidthProposal(layers=[0]), [0, 4]).mlp_shares is None  # even split


def test_shares_must_match_the_layers():
    context = PlannerContext(iteration=1, num_layers=3, current_sparsity=0.0, target_sparsity=0.2,
                             step_budget_params=100, step_budget_fraction=0.01, layers=[
                                 {"index": i, "source": i, "params": 10, "heads": 4, "kv_heads": 2,
                                  "mlp_channels": 64} for i in range(3)])
    from agent_prune.agent.proposal import Proposal

    bad = Proposal(rationale="r", width=WidthProposal(layers=[0, 1], mlp_shares=[1.0]))
    assert any("mlp_shares" in p for p in validate_proposal(bad, context))
    negative = Proposal(rationale="r", width=WidthProposal(layers=[0, 1], mlp_shares=[1.0, -1.0]))
    assert any("non-negative" in p for p in validate_proposal(negative, context))


def test_the_heuristic_thins_the_suggested_layers_in_the_suggested_amounts():
    from agent_prune.agent.planners.heuristic import heuristic_proposal

    rows = [{"index": i, "source": i, "params": 10, "heads": 4, "kv_heads": 2, "mlp_channels": 64,
             "z": {"block_influence": float(i)}, "mlp_cut": cut} for i, cut in enumerate([0, 7, 3, 0])]
    context = PlannerContext(iteration=1, num_layers=4, current_sparsity=0.0, target_sparsity=0.2,
                             step_budget_params=100, step_budget_fraction=0.01, layers=rows)
    width = heuristic_proposal(context).width
    assert (width.layers, width.mlp_shares, width.pruner) == ([1, 2], [7.0, 3.0], "l2")


def test_each_sizing_suggests_from_its_own_scores():
    four_weak = [0.1] * 4 + [5.0] * 26  # four channels far below the layer's typical one
    spread = [float(v) for v in range(30)]
    layers = [{"intermediate_size": 30, "structures_l2": {"mlp_channels": four_weak},
               "structures_fluctuation": {"mlp_channels": spread}},
              {"intermediate_size": 30, "structures_l2": {"mlp_channels": spread},
               "structures_fluctuation": {"mlp_channels": four_weak}}]
    budget = 30 * 4  # four channels of a hidden size of 10
    assert suggested_mlp_cuts({"layers": layers}, budget, hidden=10, dense_channels=30) == [4, 0]
    assert suggested_mlp_cuts({"layers": layers}, budget, 10, 30, sizing="fluctuation") == [0, 4]
