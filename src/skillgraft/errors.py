"""The one error family skillgraft raises for bad input.

Each error carries a one-line message naming the problem, an optional hint naming the fix, and an exit code.
The CLI prints ``error: …`` / ``hint: …``; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class SkillgraftError(Exception):
    """Base class of every error caused by the user's input or environment."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class InputError(SkillgraftError, ValueError):
    """An argument or option is invalid."""


class NotFoundError(SkillgraftError, FileNotFoundError):
    """A path or library reference does not exist."""

    exit_code = 3


class FormatError(SkillgraftError, ValueError):
    """A file is truncated, corrupt, or not of the expected kind."""

    exit_code = 4


class UnsafeFormatError(SkillgraftError, ValueError):
    """A pickle checkpoint was given without the explicit opt-in."""

    exit_code = 4


class MismatchError(SkillgraftError, ValueError):
    """Two things that must agree do not (base fingerprint, tensor names, shapes)."""

    exit_code = 5


class NumericError(SkillgraftError, FloatingPointError):
    """A tensor holds NaN or Inf."""

    exit_code = 6


class UnsupportedError(SkillgraftError, NotImplementedError):
    """A valid input uses a feature skillgraft refuses rather than mishandles (DoRA, vocab resize, …)."""

    exit_code = 7


class OutputExistsError(SkillgraftError, FileExistsError):
    """The output path exists and --overwrite was not given."""

    exit_code = 8


class LibraryError(SkillgraftError, RuntimeError):
    """The skill library is in a state that prevents the operation."""

    exit_code = 9


class WriteError(SkillgraftError, OSError):
    """Writing the output failed (disk full, permissions); nothing is left under the output name."""

    exit_code = 10


class WorkerError(SkillgraftError, RuntimeError):
    """A worker of a distributed run (a Ray actor) failed or could not start (missing package, missing path)."""

    exit_code = 11


class SkillgraftWarning(UserWarning):
    """Something skillgraft could not check and says so (the CLI prints it as ``warning: …``)."""
