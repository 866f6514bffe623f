import pytest
import torch
from torch import nn

from agent_prune.errors import InputError
from agent_prune.recovery.distill import kl_full, kl_top_k, top_k
from agent_prune.recovery.heal import HealSettings, heal, mean_kl
from tests.conftest import tiny_model
from tests.recovery.surgery import cut_mlp


def windows(count: int, seqlen: int = 32, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (count, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def teacher():
    # A larger init than the default makes the tiny model's next-token distributions peaked enough
    # for the cut to matter (KL about 0.2 nats/token).
    return tiny_model("llama", initializer_range=0.1)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_healing_lowers_held_out_kl_and_leaves_plain_linears(teacher, method):
    student = cut_mlp(teacher, 32)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    settings = HealSettings(max_tokens=64 * 32 * 3, method=method, lr=1e-3, modules=["down_proj", "o_proj"])
    report = heal(student, teacher, windows(64), settings, eval_windows=windows(8, seed=9))
    assert report.kl_after < report.kl_before
    assert report.tokens == report.steps * 4 * 32 <= settings.max_tokens
    assert report.stopped_by == "tokens"
    layers = student.model.layers
    assert all(type(layer.mlp.down_proj) is nn.Linear for layer in layers)
    assert not any("lora" in name for name, _ in student.named_modules())
    assert not hasattr(student, "peft_config")  # a later heal starts from a plain model again
    trained = [(i, m) for i in range(4) for m in ("self_attn.o_proj", "mlp.down_proj")]
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i, m in trained}
    assert sorted(report.overrides) == sorted(f"L{i}.{m}" for i, m in trained)
    assert not any(p.requires_grad for p in student.parameters())


def test_wall_clock_budget_stops_training(teacher):
    student = cut_mlp(teacher, 32)
    report = heal(student, teacher, windows(16), HealSettings(max_tokens=10**9, max_seconds=0.3))
    assert report.stopped_by == "seconds" and report.steps >= 1


def test_healed_model_reloads_with_stock_transformers(teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    student = cut_mlp(teacher, 96)  # same width as the config, so a plain save describes it
    heal(student, teacher, windows(8), HealSettings(max_tokens=8 * 32, method="lora"))
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = windows(2, seed=5)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, student(ids).logits)
    assert mean_kl(reloaded, student, ids) == pytest.approx(0.0, abs=1e-6)


def test_top_k_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_otherwise():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 50), torch.randn(2, 5, 50) * 3
    full = kl_full(student, teacher)
    assert kl_top_k(student, top_k(teacher, 50)) == pytest.approx(float(full), rel=1e-4)
    assert 0 < kl_top_k(student, top_k(teacher, 5)) <= full


def test_unknown_modules_are_rejected(teacher):
    with pytest.raises(InputError, match="unknown modules"):
        heal(cut_mlp(teacher, 32), teacher, windows(4), HealSettings(max_tokens=100, modules=["lm_head"]))
