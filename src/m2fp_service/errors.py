"""Typed service errors. Domain code raises these; ``api/errors.py`` maps them to HTTP once.

Each class carries a stable numeric ``code`` (the JSON envelope's ``code``, never 0) and the
HTTP status it maps to.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: ``message`` is meant for the person who made the request; ``detail`` (optional)
    only for the server's log (library internals the client has no use for).
    """

    code: int = 1000
    status: int = 500

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class MissingField(ServiceError):
    code, status = 1001, 400


class InvalidParameter(ServiceError):
    code, status = 1002, 400


class Unauthorized(ServiceError):
    code, status = 1003, 401


class UploadTooLarge(ServiceError):
    code, status = 1004, 413


class UnsupportedMediaType(ServiceError):
    code, status = 1005, 415


class InvalidImage(ServiceError):
    code, status = 1006, 422


class ImageTooLarge(ServiceError):
    """The image decodes but has more pixels (or a longer side) than allowed."""

    code, status = 1007, 413


class Overloaded(ServiceError):
    code, status = 1008, 503

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelNotReady(ServiceError):
    code, status = 1009, 503


class InferenceTimeout(ServiceError):
    code, status = 1010, 504


class InferenceFailed(ServiceError):
    code, status = 1011, 500


class ModelLoadError(ServiceError):
    """The model file is missing, unreadable or has no usable model card."""

    code, status = 1012, 500


class NotFound(ServiceError):
    code, status = 1013, 404


class MethodNotAllowed(ServiceError):
    code, status = 1014, 405


class UploadTimeout(ServiceError):
    """The client did not finish sending its upload in time."""

    code, status = 1015, 408
