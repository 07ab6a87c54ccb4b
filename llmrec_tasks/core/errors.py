"""Domain exceptions raised at stage boundaries; each message says what to do next."""

from __future__ import annotations


class LlmrecError(Exception):
    """Base class for every error llmrec raises on purpose."""


class ConfigError(LlmrecError):
    """A parameter or setting is invalid."""


class DataContractError(LlmrecError):
    """Input files are missing, unreadable or do not follow the input contract."""


class ValidationFailedError(LlmrecError):
    """Great Expectations suites failed; nothing downstream may run."""

    def __init__(self, message: str, report_uri: str | None = None) -> None:
        super().__init__(message)
        self.report_uri = report_uri


class StoreError(LlmrecError):
    """The object store could not be read or written."""


class BundleError(LlmrecError):
    """A published bundle is missing, partial or corrupt."""


class ModelLoadError(LlmrecError):
    """The text encoder could not be loaded from a local path."""


class QualityGateError(LlmrecError):
    """The new ranker did not pass the quality gate."""


class IndexRecallError(LlmrecError):
    """An approximate index missed the configured recall floor."""


class FeedbackError(LlmrecError):
    """Feedback could not be made durable (the write-ahead log) or reach the real-time state."""
