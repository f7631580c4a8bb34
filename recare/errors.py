"""One base class for every error a user can cause and fix: `RecareError`.

The CLI prints a `RecareError` as one line `error: ...` and exits with code 2; the app shows it
as a message. Anything else (a `KeyError` deep inside, a bare `ValueError` from a bug) is a real
bug and keeps its traceback. Each subclass names the kind of input that was wrong; the
domain modules re-export the ones they raise (`recare.config.ConfigError`, ...), so callers may
import them from either place.

Most subclasses also derive from the built-in exception that older callers caught
(`ValueError` for bad values, `RuntimeError` for loading), so code written against those keeps
working.
"""

from __future__ import annotations


class RecareError(Exception):
    """Bad input, a missing file, an unavailable model: something the user can fix. Shown in one line."""


class ConfigError(RecareError, ValueError):
    """A config value is out of range or a config file does not match the expected fields."""


class ImageInputError(RecareError, ValueError):
    """Images given by the user cannot be used (empty folder, unreadable file, broken zip)."""


class ModelLoadError(RecareError, RuntimeError):
    """A model could not be loaded; the message says why and what to do about it."""


class CareSetError(RecareError, ValueError):
    """The CARE-set cannot be built or edited with these inputs (too few candidates, unknown token, ...)."""


class CareSetFileError(RecareError, ValueError):
    """A careset.json (official or rich) is missing, malformed, or not what it claims to be."""


class RunError(RecareError):
    """A run folder is missing, belongs to someone else, or is not in a state that allows the request."""


class StateError(RunError):
    """A run's saved resume state is damaged or not what a run saves; the run cannot be resumed from it."""


class TrainingError(RecareError, RuntimeError):
    """Training stopped for a reason the user can act on (NaN loss, out of memory, mismatched inputs)."""


class EvaluationError(RecareError, RuntimeError):
    """Evaluation cannot run with these inputs (unknown detector, missing classifier weights, ...)."""


class Cancelled(RecareError):
    """A long call stopped because its cancel token was set; what it saved before stopping is kept."""
