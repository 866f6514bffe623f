"""``agent-prune resume RUN_DIR``: continue an interrupted run where it stopped."""

from __future__ import annotations

from agent_prune.commands.run import finish_command


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "resume", help="continue an interrupted run",
        description="Continue a run interrupted at any point (Ctrl-C, kill, reboot) without "
                    "repeating accepted steps. Options come from RUN_DIR/run.json.",
    )
    parser.add_argument("run_dir", help="the run directory given to 'agent-prune run --out'")
    parser.add_argument("--json", action="store_true", help="print the run summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="no live progress")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from agent_prune.agent.session import resume_run
    from agent_prune.commands.progress import make_reporter

    args.resume_hint = f"agent-prune resume {args.run_dir}"
    reporter = make_reporter(quiet=args.quiet or args.json)
    try:
        summary = resume_run(args.run_dir, reporter=reporter)
    finally:
        reporter.close()
    return finish_command(summary, args)
