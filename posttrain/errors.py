"""User-facing errors. The CLI prints these as one clear message (no traceback) and exits non-zero."""

from __future__ import annotations


class PosttrainError(Exception):
    """An error caused by the user's input (data, config, model path) rather than a bug."""


class ConfigError(PosttrainError):
    """A bad config key or value; the message names the key's path."""


class DataError(PosttrainError):
    """A bad data row or file; the message names the file, the line and the field."""

    def __init__(self, source: str, line: int | None, field: str | None, reason: str):
        self.source, self.line, self.field, self.reason = source, line, field, reason
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: " + (f"field {field!r}: " if field else "") + reason)


class ModelError(PosttrainError):
    """A model or tokenizer that cannot be loaded."""


class TrainingError(PosttrainError):
    """A training run that had to stop (for example repeated non-finite losses)."""
