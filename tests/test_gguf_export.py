"""GGUF export: read back by transformers (uniform widths) and run by llama.cpp itself (all widths)."""

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from agent_prune.actions import apply_actions, dense_manifest
from agent_prune.errors import InputError
from agent_prune.models.gguf_export import export_gguf
from tests.compensation import calibration_ids, compensated_cut
from tests.conftest import save_tiny, tiny_merged_tokenizer, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENS = [5, 17, 99, 3, 250, 64, 8, 1, 42, 77, 120, 200]
UNIFORM = [{"kind": "remove_layers", "layers": [2]}] + [
    {"kind": "prune_width", "layer": i, "heads": 1, "mlp_channels": 32} for i in range(3)]
# Layer 1 loses a KV group, layer 2 MLP channels that leave 86 (not whole Q8_0 blocks of 32).
MIXED = [{"kind": "prune_width", "layer": 1, "kv_groups": 1},
         {"kind": "prune_width", "layer": 2, "mlp_channels": 10}, {"kind": "remove_layers", "layers": [3]}]


def pruned(actions, **overrides):
    model = tiny_model("llama", **overrides)
    return model, apply_actions(model, actions, dense_manifest(model))


def logits(model, ids=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("quant, tolerance", [("F32", 1e-5), ("Q8_0", 0.05)])
def test_uniform_export_reads_back_in_transformers(tmp_path, quant, tolerance):
    from transformers import AutoModelForCausalLM

    model, manifest = pruned(UNIFORM)
    summary = export_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", manifest, quant=quant)
    assert summary.architecture == "llama" and not summary.heterogeneous
    assert summary.tensor_types[quant] > 0 and summary.f16_fallbacks == []
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert back.config.num_hidden_layers == 3 and back.config.num_attention_heads == 2
    expected = logits(model)
    assert (logits(back) - expected).abs().max() <= tolerance * expected.abs().max()


def test_mixed_widths_are_written_as_deci_with_per_layer_arrays(tmp_path):
    model, manifest = pruned(MIXED)
    summary = export_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", manifest, quant="Q8_0")
    assert summary.architecture == "deci" and summary.heterogeneous
    # 86 channels are not whole Q8_0 blocks of 32: padded with 10 zero channels, not written F16
    assert summary.f16_fallbacks == [] and summary.zero_padded_channels == {2: 10}
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    fields = {key: field.contents() for key, field in reader.fields.items()
              if key.startswith("deci.") or key == "general.architecture"}
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [w.num_heads for w in manifest.widths()] == [4, 2, 4]
    assert fields["deci.attention.head_count_kv"] == [2, 1, 2]
    assert fields["deci.feed_forward_length"] == 96  # every layer: 96, or 86 padded to 96
    assert fields["deci.attention.key_length"] == 16
    shapes = {t.name: t.shape.tolist() for t in reader.tensors}
    assert shapes["blk.1.attn_q.weight"] == [64, 32] and shapes["blk.2.ffn_down.weight"] == [96, 64]
    assert reader.fields["agent_prune.manifest"].contents() == manifest.to_json()


def test_zero_padding_to_whole_blocks_keeps_the_function(tmp_path):
    """An MLP width that is not whole quantisation blocks is padded with zero channels: the file reads
    back as a wider but equivalent model."""
    from transformers import AutoModelForCausalLM

    model, manifest = pruned([{"kind": "prune_width", "layer": i, "mlp_channels": 10} for i in range(4)])
    summary = export_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", manifest, quant="Q8_0")
    assert summary.architecture == "llama" and summary.zero_padded_channels == dict.fromkeys(range(4), 10)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert back.config.intermediate_size == 96
    padding = [layer.mlp.down_proj.weight.detach()[:, 86:] for layer in back.model.layers]
    assert all(float(p.abs().max()) == 0.0 for p in padding)
    expected = logits(model)
    assert (logits(back) - expected).abs().max() <= 0.05 * expected.abs().max()


def test_bad_input_is_refused(tmp_path):
    model, manifest = pruned(UNIFORM)
    with pytest.raises(InputError, match="Q3_K"):
        export_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", manifest, quant="Q3_K")
    with pytest.raises(InputError, match=r"\.gguf"):
        export_gguf(model, tiny_tokenizer(), tmp_path / "m.bin", manifest)
    qwen = tiny_model("qwen2")
    with pytest.raises(InputError, match="llama-family"):
        export_gguf(qwen, tiny_tokenizer(), tmp_path / "q.gguf", dense_manifest(qwen))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_cli_apply_writes_gguf_and_refuses_quant_without_it(tmp_path):
    folder = save_tiny(tmp_path / "model")
    actions = json.dumps(MIXED)
    run = [sys.executable, "-m", "agent_prune", "apply", "--model", str(folder), "--actions", actions]
    ok = subprocess.run([*run, "--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--json"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    export = json.loads(ok.stdout)["export"]
    assert export["format"] == "gguf" and export["architecture"] == "deci"
    assert export["quant"] == "Q8_0" and export["bytes"] == (tmp_path / "m.gguf").stat().st_size
    bad = subprocess.run([*run, "--quant", "Q8_0", "--out", str(tmp_path / "x")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --quant applies to GGUF")


@pytest.mark.parametrize("actions, arch", [(UNIFORM, "llama"), (MIXED, "deci")])
def test_compensation_biases_are_written_as_f32_tensors(tmp_path, actions, arch):
    """o_proj/down_proj biases go out as attn_output.bias / ffn_down.bias (F32, exact); a bias of zeros
    (here q_proj's, as a reloaded stock Llama export has) is left out."""
    model, manifest = compensated_cut(tiny_model("llama"), actions, calibration_ids())
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.bias = torch.nn.Parameter(torch.zeros(q_proj.out_features))
    summary = export_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", manifest, quant="Q8_0")
    assert summary.architecture == arch and "transformers" not in summary.loads_with
    expected = {f"blk.{i}.{name}.bias": layer.get_submodule(path).bias.detach().numpy()
                for i, layer in enumerate(model.model.layers)
                for name, path in (("attn_output", "self_attn.o_proj"), ("ffn_down", "mlp.down_proj"))
                if layer.get_submodule(path).bias is not None}
    assert len(expected) == (6 if arch == "llama" else 2)
    written = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if t.name.endswith(".bias")}
    assert written.keys() == expected.keys()
    for name, values in expected.items():
        assert written[name].tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(np.asarray(written[name].data), values)


@pytest.mark.parametrize("actions, quant, tolerance, biases",
                         [(UNIFORM, "F32", 1e-3, False), (MIXED, "F32", 1e-3, False),
                          (MIXED, "Q8_0", 0.05, False), (UNIFORM, "F32", 1e-3, True),
                          (MIXED, "F32", 1e-3, True)],
                         ids=["uniform-llama", "mixed-deci", "mixed-deci-zero-padded-q8",
                              "uniform-llama-biases", "mixed-deci-biases"])
def test_llama_cpp_runs_the_export_like_transformers(tmp_path, actions, quant, tolerance, biases):
    """llama.cpp's own logits of an export match the pruned torch model's (at Q8_0 the 86-channel MLP
    is padded to 96 with zero channels; with biases it adds attn_output.bias and ffn_down.bias)."""
    pytest.importorskip("llama_cpp")
    from agent_prune.evaluation.llamacpp import open_gguf

    if biases:
        model, manifest = compensated_cut(tiny_model("llama"), actions, calibration_ids())
    else:
        model, manifest = pruned(actions)
    summary = export_gguf(model, tiny_merged_tokenizer(), tmp_path / "m.gguf", manifest, quant=quant)
    assert summary.zero_padded_channels == ({2: 10} if quant == "Q8_0" else {})
    with open_gguf(tmp_path / "m.gguf", n_ctx=32, threads=1, logits_all=True) as llm:
        llm.eval(TOKENS)
        engine = torch.from_numpy(np.array(llm.scores[: len(TOKENS)]))
    expected = logits(model)
    assert (engine - expected).abs().max() <= tolerance * expected.abs().max()


def test_engine_check_passes_a_good_file_and_names_a_broken_one(tmp_path):
    """The probe runs the file in a child process, so an engine that dies cannot take the caller."""
    pytest.importorskip("llama_cpp")
    from agent_prune.evaluation.llamacpp import check_engine

    model, manifest = pruned(MIXED)
    export_gguf(model, tiny_merged_tokenizer(), tmp_path / "m.gguf", manifest, quant="Q8_0")
    check_engine(tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cannot run .*cut\.gguf"):
        check_engine(tmp_path / "cut.gguf")


def test_a_gguf_input_passes_its_metadata_on_without_duplicate_keys(tmp_path, caplog):
    """general.* comes from the input GGUF, except the keys the writer sets (no "Duplicated key")."""
    dense = tiny_model("llama")
    export_gguf(dense, tiny_merged_tokenizer(), tmp_path / "in.gguf", dense_manifest(dense), quant="F32")
    model, manifest = pruned(MIXED)
    with caplog.at_level("WARNING"):
        export_gguf(model, tiny_merged_tokenizer(), tmp_path / "out.gguf", manifest, quant="Q8_0",
                    reference=tmp_path / "in.gguf")
    assert not [r for r in caplog.records if "Duplicated key" in r.getMessage()]
    fields = gguf.GGUFReader(tmp_path / "out.gguf").fields
    assert fields["general.architecture"].contents() == "deci"
    assert fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)


def test_a_gguf_run_reports_llama_cpp_speed_of_dense_and_pruned(tmp_path):
    """The run's final export as GGUF, measured in llama.cpp beside the dense GGUF of the same types."""
    pytest.importorskip("llama_cpp")
    from agent_prune.agent.session import start_run
    from tests.agent.loop_fixtures import tiny_run_options

    model_dir = tmp_path / "model"  # a tokenizer llama.cpp loads (tiny_run_options keeps this folder)
    tiny_model("llama", num_hidden_layers=6).save_pretrained(model_dir)
    tiny_merged_tokenizer().save_pretrained(model_dir)
    summary = start_run(tiny_run_options(tmp_path, recovery="none", target_sparsity=0.1, export_format="gguf",
                                         export_quant="Q8_0", final_eval={"windows": 0}))
    speed = summary["final"]["llama_cpp_speed"]
    assert speed is not None and "interleaved" in speed["protocol"]
    for name in ("dense", "pruned"):
        assert speed[name]["prompt_tokens_per_s"] > 0 and speed[name]["gen_tokens_per_s"] > 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "llama.cpp prompt tokens/s" in report and "llama.cpp generation tokens/s" in report
