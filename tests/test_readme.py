"""README commands stay true: every `agent-prune ...` line parses with today's CLI, every `make`
target exists, every bench script named is there, and every sub-command is documented."""

import re
import shlex
from pathlib import Path

import pytest

from agent_prune.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def shell_lines(text: str) -> list[str]:
    """Commands in ```bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        lines += [line.split(" #")[0].strip() for line in joined.splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
    return lines


CLI_LINES = [line for line in shell_lines(README) if line.startswith("agent-prune ")]


def test_readme_has_commands_to_check():
    assert len(CLI_LINES) >= 8
    for name in COMMANDS:
        assert f"agent-prune {name}" in README, f"README does not show 'agent-prune {name}'"


@pytest.mark.parametrize("line", CLI_LINES)
def test_readme_cli_line_parses(line):
    args = build_parser().parse_args(shlex.split(line)[1:])
    assert args.command in COMMANDS


def test_make_targets_and_bench_scripts_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"^make ([\w-]+)", "\n".join(shell_lines(README)), flags=re.M):
        assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), f"no make target {target}"
    modules = re.findall(r"python -m (bench\.\w+)", README)
    scripts = re.findall(r"`(bench/\w+\.py)`", README)
    assert modules and scripts
    for module in modules:  # a package (bench/compare/) or a module file (bench/gguf_speed.py)
        path = ROOT / module.replace(".", "/")
        assert path.is_dir() or path.with_suffix(".py").is_file(), module
    for script in scripts:
        assert (ROOT / script).is_file(), script
