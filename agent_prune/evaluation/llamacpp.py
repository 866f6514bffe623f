"""Measure a GGUF file in llama.cpp itself (through llama-cpp-python, an optional extra).

Perplexity follows the same protocol as :mod:`agent_prune.evaluation.perplexity` (each window
scored alone, mean next-token NLL over ``seqlen - 1`` positions) on windows the caller tokenised,
so both engines see the very same token ids. Speed interleaves the models repetition by repetition,
so a load change on a shared machine hits each model alike, and reports medians.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch

from agent_prune.errors import InputError

PROMPT_TOKENS = 512
GENERATED_TOKENS = 64


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise InputError("llama-cpp-python is not installed",
                         "pip install 'agent-prune[gguf-runtime]' (builds llama.cpp from source)") from None
    return llama_cpp


# Loads the file and runs a few tokens: enough to reach the quantised matmul kernels.
_PROBE = ("import sys, llama_cpp; llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=16, n_threads=1, "
          "verbose=False); llm.eval([1, 2, 3, 4])")
REBUILD_HINT = ("rebuild llama-cpp-python without the kernels this machine faults on, e.g. "
                "CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF "
                "-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF' pip install --force-reinstall --no-cache-dir "
                "--no-deps llama-cpp-python (docs/benchmarks.md, GGUF in llama.cpp)")


def check_engine(path: str | Path) -> None:
    """Run ``path`` for a few tokens in a child process before measuring it in this one.

    A llama.cpp build can kill its process outright: a native build on a CPU that lists AMX, under
    a kernel that does not enable AMX tile state, faults in ``ldtilecfg`` on the first quantised
    matmul (found on this project's VMs). In-process that would end a run with no message at all.
    """
    require_llama_cpp()
    done = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True,
                          timeout=600)
    if done.returncode < 0:
        raise InputError(f"llama.cpp crashed (signal {-done.returncode}) running {path}", REBUILD_HINT)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise InputError(f"llama.cpp cannot run {path}: {last}", "check the file with agent-prune eval")


@contextmanager
def open_gguf(path: str | Path, n_ctx: int, threads: int, logits_all: bool = False):
    """A llama.cpp context for ``path``, closed on exit (contexts hold the KV cache)."""
    llama_cpp = require_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                          n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                          verbose=False)
    try:
        yield llm
    finally:
        llm.close()


def log_softmax_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean NLL (nats) of ``ids[1:]`` under ``logits[:-1]`` (float64 for a stable log-sum-exp)."""
    scores = torch.from_numpy(np.ascontiguousarray(logits[:-1], dtype=np.float64))
    return float(torch.nn.functional.cross_entropy(scores, torch.from_numpy(ids[1:]).long()))


def window_nlls(path: str | Path, windows: torch.Tensor, threads: int = 2) -> torch.Tensor:
    """Mean next-token NLL of each ``[N, seqlen]`` window, computed from llama.cpp's own logits."""
    seqlen = windows.shape[1]
    nlls = []
    with open_gguf(path, n_ctx=seqlen, threads=threads, logits_all=True) as llm:
        for window in windows.numpy():
            llm.reset()
            llm.eval(window.tolist())
            nlls.append(log_softmax_nll(llm.scores[:seqlen], window))
    return torch.tensor(nlls, dtype=torch.float64)


def greedy_text(path: str | Path, prompt: str, max_tokens: int = 24, threads: int = 2) -> str:
    with open_gguf(path, n_ctx=512, threads=threads) as llm:
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
    return out["choices"][0]["text"]


def _one_timing(llm, prompt: list[int], generated: int) -> tuple[float, float]:
    """Seconds for the prompt (one batch) and for ``generated`` greedy tokens one at a time."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prompt_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(generated):
        # Only the last row of scores is filled without logits_all: that is the next-token row.
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return prompt_s, time.perf_counter() - start


def measure_speed(paths: dict[str, str | Path], prompt: list[int], generated: int = GENERATED_TOKENS,
                  repeats: int = 5, threads: int = 2) -> dict:
    """Prompt and generation tokens/s per model: interleaved repetitions after one warm-up, medians."""
    n_ctx = len(prompt) + generated + 1
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    with ExitStack() as stack:
        llms = {name: stack.enter_context(open_gguf(path, n_ctx=n_ctx, threads=threads))
                for name, path in paths.items()}
        for repeat in range(repeats + 1):
            for name, llm in llms.items():
                timing = _one_timing(llm, prompt, generated)
                if repeat:  # the first round warms caches and the thread pool
                    times[name].append(timing)
    result = {}
    for name, rows in times.items():
        prompt_s = statistics.median(r[0] for r in rows)
        gen_s = statistics.median(r[1] for r in rows)
        result[name] = {"prompt_tokens_per_s": len(prompt) / prompt_s, "gen_tokens_per_s": generated / gen_s,
                        "prompt_s": [r[0] for r in rows], "gen_s": [r[1] for r in rows]}
    result["protocol"] = (f"llama.cpp via llama-cpp-python, {threads} threads, prompt of {len(prompt)} "
                          f"tokens in one batch, then {generated} greedy tokens one by one; {repeats} "
                          "repetitions interleaved across models after one warm-up round; medians")
    return result
