"""``--alternative-sizings``: which extra width candidates each step builds and measures."""

import pytest

from agent_prune.cli import build_parser
from agent_prune.commands.run import options_from_args

BASE = ["run", "--model", "m", "--out", "o", "--target-sparsity", "0.2"]


def options(*extra: str):
    return options_from_args(build_parser().parse_args([*BASE, *extra]))


def test_by_default_each_step_also_builds_a_width_candidate_sized_by_fluctuation():
    assert options().alternative_sizings == ["fluctuation"]


def test_none_leaves_one_width_candidate_and_names_are_checked():
    assert options("--alternative-sizings", "none").alternative_sizings == []
    assert options("--alternative-sizings", "l2, fluctuation").alternative_sizings == ["l2", "fluctuation"]
    with pytest.raises(Exception, match="'l2' or 'fluctuation'"):
        options("--alternative-sizings", "taylor")
