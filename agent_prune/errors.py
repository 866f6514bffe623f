"""Errors a user can act on.

Every problem caused by input (a path, a flag, a planner reply) is raised as a subclass of
:class:`AgentPruneError`; the CLI prints ``error: <message> (<hint>)`` on one line and exits with
the error's exit code instead of showing a traceback. Anything else is a crash (a bug, or the
machine ran out of memory): one line too, with its own exit code, and ``--debug`` for the traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_TARGET_NOT_REACHED = 1
EXIT_BAD_INPUT = 2
EXIT_CRASH = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so a terminated run stops (and resumes) exactly alike."""


class AgentPruneError(Exception):
    """A failure the user can fix; ``hint`` says how."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message if not self.hint else f"{self.message} ({self.hint})"
        return " ".join(text.split())


class InputError(AgentPruneError):
    """Bad user input: a path, a flag value, a file that is not what it claims to be."""


class UnsupportedModelError(AgentPruneError):
    """The model's architecture has no adapter."""


class InvalidActionError(AgentPruneError):
    """A pruning action that cannot be applied to the model as it is."""


class PlannerError(AgentPruneError):
    """A planner could not produce a usable proposal (network, refusal, garbage)."""
