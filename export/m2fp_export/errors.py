"""Typed exporter errors; the CLI prints their message and exits non-zero."""

from __future__ import annotations


class ExportError(Exception):
    """Base class of everything the exporter reports to a person."""


class NotAnM2FPModel(ExportError):
    """A --checkpoint directory that is not a ModelScope M2FP model repository."""


class HubUnavailable(ExportError):
    """The ModelScope hub could not be reached or does not have the model."""


class UntrustedCheckpoint(ExportError):
    """The checkpoint needs full pickle loading, which we only do when told to trust it."""


class ParityError(ExportError):
    """ONNX Runtime and PyTorch disagree by more than the tolerance on some output."""

    def __init__(self, message: str, diffs: dict[str, float]) -> None:
        super().__init__(message)
        self.diffs = diffs
