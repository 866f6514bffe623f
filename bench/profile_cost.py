"""What a full sensitivity profile costs, against one plain forward + backward on the same tokens.

    python bench/profile_cost.py --model ../shared/models/smollm2-135m-instruct \
        --data-dir ../shared/data --samples 32 --seqlen 512 --out bench/results/profile_cost_32x512.json

Three measurements, all on the same C4 calibration windows (seed 0):

1. Time (one process, so CPU contention from other jobs hits both sides alike): a plain
   ``model(ids, labels=ids).loss.backward()`` over all windows in batches of
   ``--plain-batch-size`` (gradients accumulated, the usual way), then ``profile_model`` with
   gradients and ``--batch-size``, alternated ``--repeats`` times; the ratio is
   median(profile) / median(plain).
2. Peak memory (a fresh child process; ``--plain-memory`` adds one for the plain pass): RSS after
   loading the model, reading every weight once (safetensors maps lazily) and building the
   windows (``profile_warm``, a diagnostic: also after a 1 x 32-token profile); then the
   kernel's peak-RSS counter is reset (``/proc/self/clear_refs`` = 5) and read
   back (``VmHWM``) after the work; "above the loaded model" = peak - RSS before the work. The
   target is < 50% of the model's fp32 size (parameters x 4 bytes).
3. Block Influence ranking agreement with a plain ``output_hidden_states=True`` forward. In
   transformers 5 the last entry of ``hidden_states`` is after the final norm, so the last layer's
   raw output is taken with a forward hook (the naive comparison is reported too).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent_prune.data.corpora import c4_documents, calibration_windows
from agent_prune.data.sources import resolve_data_dir
from agent_prune.models.loading import load_model
from agent_prune.sensitivity import profile_model


def main() -> int:
    args = parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return 0
    loaded, windows = setup(args)
    timing = time_both(loaded.model, windows, args)
    ranking = block_influence_agreement(loaded, windows, timing.pop("profile"), args)
    del loaded
    gc.collect()
    sides = ("profile", "profile_warm", "plain") if args.plain_memory else ("profile", "profile_warm")
    memory = {side: run_child(args, side) for side in sides}
    fp32_bytes = memory["profile"]["params"] * 4
    result = {
        "protocol": protocol(args, windows),
        "time": timing,
        "memory": memory | {
            "fp32_model_bytes": fp32_bytes,
            "profile_peak_over_fp32": memory["profile"]["peak_above_loaded_bytes"] / fp32_bytes,
            "target": "< 0.5",
        },
        "block_influence_ranking": ranking,
    }
    print_table(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, args.out)
    return 0


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=2, help="profile batch size")
    p.add_argument("--plain-batch-size", type=int, default=4, help="plain forward+backward batch size")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--plain-memory", action="store_true",
                   help="also measure the plain forward+backward's peak memory (several GB)")
    p.add_argument("--memory-child", choices=("profile", "profile_warm", "plain"), default=None,
                   help=argparse.SUPPRESS)
    return p.parse_args()


def setup(args):
    loaded = load_model(args.model)
    docs = c4_documents(resolve_data_dir(args.data_dir))
    windows = calibration_windows(loaded.tokenizer, docs, args.samples, args.seqlen, args.seed)
    return loaded, windows


# ---- 1. time -----------------------------------------------------------------------------------
def plain_forward_backward(model, windows: torch.Tensor, batch_size: int, device: str) -> float:
    """One ordinary training-style pass: mean LM loss over all windows, gradients accumulated."""
    model.to(device).train(False)
    model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        loss = model(ids, labels=ids).loss * (ids.shape[0] / windows.shape[0])
        loss.backward()
    seconds = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    return seconds


def time_both(model, windows: torch.Tensor, args) -> dict:
    plain, full = [], []
    profile = None
    for _ in range(args.repeats):
        plain.append(plain_forward_backward(model, windows, args.plain_batch_size, args.device))
        started = time.perf_counter()
        profile = profile_model(model, windows, device=args.device, batch_size=args.batch_size,
                                dataset="c4", seed=args.seed)
        full.append(time.perf_counter() - started)
    return {
        "plain_forward_backward_s": plain,
        "profile_s": full,
        "profile_forward_s": profile.cost.forward_seconds,
        "profile_gradient_s": profile.cost.gradient_seconds,
        "ratio": statistics.median(full) / statistics.median(plain),
        "target": "<= 3.0",
        "profile": profile,
    }


# ---- 2. memory ---------------------------------------------------------------------------------
def run_child(args, side: str) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", side] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
        if k not in ("memory_child", "out", "repeats", "plain_memory") and v is not None
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_child(args) -> dict:
    loaded, windows = setup(args)
    page_in(loaded.model)
    gc.collect()
    if args.memory_child == "profile_warm":
        # A 1 x 32-token profile first: torch's one-time runtime set-up (thread pools, kernel and
        # autograd state) happens here with tiny tensors, so it neither counts nor pre-grows the heap.
        profile_model(loaded.model, windows[:1, :32], device=args.device, batch_size=1)
        gc.collect()
    loaded_rss = proc_status("VmRSS")
    reset_peak()
    if args.memory_child.startswith("profile"):
        profile_model(loaded.model, windows, device=args.device, batch_size=args.batch_size)
    else:
        loaded.model.requires_grad_(True)
        plain_forward_backward(loaded.model, windows, args.plain_batch_size, args.device)
    peak = proc_status("VmHWM")
    return {
        "side": args.memory_child,
        "params": sum(p.numel() for p in loaded.model.parameters()),
        "loaded_rss_bytes": loaded_rss,
        "peak_rss_bytes": peak,
        "peak_above_loaded_bytes": peak - loaded_rss,
    }


@torch.no_grad()
def page_in(model) -> None:
    """Read every weight once: safetensors maps the file lazily, so an untouched model is not yet
    resident and its own pages would otherwise be counted as the work's memory."""
    for tensor in model.state_dict().values():
        tensor.float().sum()


def proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def reset_peak() -> None:
    """Reset the kernel's peak-RSS counter so VmHWM measures only what follows."""
    Path("/proc/self/clear_refs").write_text("5")


# ---- 3. Block Influence ranking ----------------------------------------------------------------
@torch.no_grad()
def block_influence_agreement(loaded, windows: torch.Tensor, profile, args) -> dict:
    model, adapter = loaded.model, loaded.adapter
    layers = adapter.num_layers
    sums, naive, tokens = [0.0] * layers, [0.0] * layers, 0
    last = []
    hook = adapter.layers()[-1].register_forward_hook(lambda m, a, o: last.append(o))
    for start in range(0, windows.shape[0], args.batch_size):
        ids = windows[start : start + args.batch_size]
        states = list(model(ids, output_hidden_states=True).hidden_states)
        raw = [*states[:-1], last.pop()]
        for i in range(layers):
            sums[i] += float(torch.nn.functional.cosine_similarity(raw[i], raw[i + 1], dim=-1).sum())
            naive[i] += float(torch.nn.functional.cosine_similarity(states[i], states[i + 1], dim=-1).sum())
        tokens += ids.numel()
    hook.remove()
    plain = [1 - s / tokens for s in sums]
    plain_naive = [1 - s / tokens for s in naive]
    ours = profile.metric("block_influence")
    rank = lambda values: sorted(range(len(values)), key=lambda i: values[i])  # noqa: E731
    return {
        "profile": ours,
        "output_hidden_states": plain,
        "max_abs_difference": max(abs(a - b) for a, b in zip(ours, plain)),
        "same_ranking": rank(ours) == rank(plain),
        "ranking_lowest_first": rank(ours),
        "naive_last_entry_post_norm_same_ranking": rank(ours) == rank(plain_naive),
    }


# ---- report ------------------------------------------------------------------------------------
def protocol(args, windows) -> dict:
    return {
        "model": args.model, "calibration": "C4 en train first 1000 docs, random windows",
        "samples": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "seed": args.seed,
        "batch_size": args.batch_size, "plain_batch_size": args.plain_batch_size, "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(),
        "machine": platform.machine(), "torch": torch.__version__,
    }


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t, m, r = result["time"], result["memory"], result["block_influence_ranking"]
    proto = result["protocol"]
    table = Table(title=f"profile cost ({proto['samples']} x {proto['seqlen']} tokens)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    seconds = lambda values: ", ".join(f"{s:.1f}" for s in values)  # noqa: E731
    table.add_row("plain forward+backward (s)", seconds(t["plain_forward_backward_s"]), "")
    table.add_row("full profile with gradients (s)", seconds(t["profile_s"]), "")
    table.add_row("time ratio", f"{t['ratio']:.2f}", t["target"])
    mib = 2**20
    table.add_row("fp32 model size (MiB)", f"{m['fp32_model_bytes'] / mib:.0f}", "")
    for side in sorted(m.keys() & {"profile", "profile_warm", "plain"}):
        table.add_row(f"{side}: peak RSS above loaded model (MiB)",
                      f"{m[side]['peak_above_loaded_bytes'] / mib:.0f}", "")
    table.add_row("profile peak / fp32 model", f"{m['profile_peak_over_fp32']:.2f}", m["target"])
    table.add_row("BI ranking = output_hidden_states", str(r["same_ranking"]), "True")
    table.add_row("BI max |difference|", f"{r['max_abs_difference']:.2e}", "")
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
