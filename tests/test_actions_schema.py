import pytest

from agent_prune.actions import MaskSparsity, PruneWidth, RemoveLayers, describe, parse_actions
from agent_prune.errors import InvalidActionError


def test_parse_json_list_of_every_kind():
    actions = parse_actions(
        '[{"kind": "remove_layers", "layers": [12, 13]},'
        ' {"kind": "prune_width", "layer": 3, "mlp_channels": 0.25, "kv_groups": 1},'
        ' {"kind": "mask_sparsity", "layer": 2, "pattern": "2:4"}]'
    )
    assert [type(a) for a in actions] == [RemoveLayers, PruneWidth, MaskSparsity]
    assert actions[1].mlp_channels == 0.25 and isinstance(actions[1].kv_groups, int)
    assert actions[2].effective_ratio == 0.5 and actions[2].n_m == (2, 4)
    assert describe(actions[1]) == "prune_width(layer=3, kv_groups=1, mlp_channels=0.25)"
    assert parse_actions(actions) == actions  # already-parsed actions pass through


@pytest.mark.parametrize(("item", "fragment"), [
    ({"kind": "prune_width", "layer": 0, "mlp_channels": 1.0}, "outside [0, 1)"),
    ({"kind": "prune_width", "layer": 0, "heads": -1}, "negative"),
    ({"kind": "prune_width", "layer": 0, "kv_groups": True}, "boolean"),
    ({"kind": "remove_layers", "layers": [3, 3]}, "twice"),
    ({"kind": "remove_layers", "layers": []}, "layers"),
    ({"kind": "mask_sparsity", "layer": 0}, "needs a ratio"),
    ({"kind": "mask_sparsity", "layer": 0, "ratio": 1.5}, "outside (0, 1)"),
    ({"kind": "mask_sparsity", "layer": 0, "ratio": 0.3, "pattern": "2:4"}, "exactly 0.5"),
    ({"kind": "mask_sparsity", "layer": 0, "pattern": "3:4"}, "pattern"),
    ({"kind": "heal", "steps": 10}, "kind"),
    ({"kind": "remove_layers", "layers": [1], "colour": "red"}, "colour"),
])
def test_invalid_actions_are_one_line_errors(item, fragment):
    with pytest.raises(InvalidActionError) as info:
        parse_actions([item])
    assert fragment in info.value.message
    assert "\n" not in info.value.one_line()


def test_bad_json_is_a_clear_error():
    with pytest.raises(InvalidActionError, match="not valid JSON"):
        parse_actions("[{kind: remove_layers}")


def test_schema_imports_without_torch():
    import subprocess
    import sys

    code = ("import sys; from agent_prune.actions import parse_actions; "
            "parse_actions([{'kind': 'remove_layers', 'layers': [1]}]); print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
