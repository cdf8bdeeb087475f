"""Error types whose messages name the file or field and what was expected."""

from __future__ import annotations


class DakdError(Exception):
    """Base class: a user-facing error with a clear message (no traceback needed)."""


class ConfigError(DakdError):
    """A config file, field or override is invalid."""


class DataError(DakdError):
    """A source file or sample is invalid. `path` names it; the message says what was expected."""

    def __init__(self, path: str, message: str):
        self.path = str(path)
        self.reason = message
        super().__init__(f"{path}: {message}")

    def __reduce__(self):  # survives pickling between Ray processes
        return (type(self), (self.path, self.reason))


class StorageError(DakdError):
    """A storage URI cannot be read or written."""


class TuneError(DakdError):
    """The sweep could not produce a result (e.g. every trial failed)."""


class RunBusyError(DakdError):
    """Another job on this Ray cluster is writing the same run (output location)."""


class TrainingError(DakdError):
    """Training stopped (e.g. a non-finite loss); the last good checkpoint is intact."""


class TrackingError(DakdError):
    """The MLflow tracking server cannot be reached or refused a request."""


class SynthesisError(DakdError):
    """The synthesis job failed (an actor error); finished ranges are kept for a re-run."""
