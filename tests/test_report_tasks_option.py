"""``--report-tasks`` / ``report_tasks``: the report's before/after measurements are the user's choice."""

import pytest

from agent_prune.agent.options import REPORT_TASKS
from agent_prune.cli import build_parser
from agent_prune.commands.run import options_from_args
from agent_prune.errors import InputError

BASE = ["run", "--model", "m", "--out", "o", "--target-sparsity", "0.2"]


def options(*extra: str):
    return options_from_args(build_parser().parse_args([*BASE, *extra]))


def test_default_is_the_full_protocol_with_speed():
    final = options().final_eval
    assert final.tasks == list(REPORT_TASKS) == ["wikitext2", "freebaseqa", "arc_easy"] and final.speed


def test_the_flag_picks_tasks_and_speed():
    final = options("--report-tasks", "arc_easy, wikitext2").final_eval
    assert final.tasks == ["arc_easy", "wikitext2"] and not final.speed
    final = options("--report-tasks", "speed").final_eval
    assert final.tasks == [] and final.speed


def test_the_config_key_is_read_and_the_flag_overrides_it(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('report_tasks = ["csqa", "speed"]\n')
    final = options("--config", str(config)).final_eval
    assert final.tasks == ["csqa"] and final.speed
    assert options("--config", str(config), "--report-tasks", "mmlu").final_eval.tasks == ["mmlu"]


def test_an_unknown_task_is_bad_input():
    with pytest.raises(InputError, match="unknown task hellaswag"):
        options("--report-tasks", "wikitext2,hellaswag")
