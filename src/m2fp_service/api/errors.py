"""The one place where errors become HTTP responses.

Every error answer is the envelope ``{"code": <nonzero>, "message": "...", "data": null}`` with
the status of the ``ServiceError`` class (see ``m2fp_service.errors``). FastAPI's request
validation errors and Starlette's 404/405 are converted to ``ServiceError`` first.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from m2fp_service.errors import InvalidParameter, MethodNotAllowed, NotFound, ServiceError

log = logging.getLogger("m2fp.api")

INTERNAL_ERROR_CODE = ServiceError.code


def error_body(code: int, message: str) -> dict[str, object]:
    return {"code": code, "message": message, "data": None}


def error_response(exc: ServiceError) -> JSONResponse:
    """The envelope and status for a ``ServiceError``; ``Retry-After`` when the class has one.

    A client told to come back later also gets ``Connection: close``: a kept-alive connection would
    sit idle through the wait, and a client waiting about as long as the server's keep-alive timeout
    (uvicorn: 5 s) races the server closing it ("remote end closed connection without response")."""
    headers = {}
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers["Retry-After"] = str(int(retry_after))
        headers["Connection"] = "close"
    return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status, headers=headers)


def internal_error_response(request_id: str) -> JSONResponse:
    """A server fault nobody anticipated (the traceback goes to the log, not the client)."""
    return JSONResponse(
        error_body(INTERNAL_ERROR_CODE, f"internal server error; quote request id {request_id} when reporting it"),
        status_code=500,
    )


def _from_validation(exc: RequestValidationError) -> ServiceError:
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    return InvalidParameter("invalid request: " + "; ".join(problems))


def _from_http(exc: StarletteHTTPException, request: Request) -> ServiceError:
    if exc.status_code == 404:
        return NotFound(f"no such endpoint: {request.method} {request.url.path}; see /docs")
    if exc.status_code == 405:
        return MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}; see /docs")
    err = ServiceError(str(exc.detail))
    err.status = exc.status_code
    return err


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    if exc.status in (503, 504):  # routine under load: counted in metrics
        return error_response(exc)
    if exc.status >= 500:  # a server fault: the details go to the log, the request id to the client
        log.error("%s: %s%s", type(exc).__name__, exc.message, f" ({exc.detail})" if exc.detail else "")
        rid = getattr(request.state, "request_id", None) or "?"
        fault = type(exc)(f"{exc.message}; quote request id {rid} when reporting it")
        fault.status = exc.status
        return error_response(fault)
    return error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(_from_validation(exc))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    response = error_response(_from_http(exc, request))
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def register_error_handlers(app: FastAPI) -> None:
    """Installs the handlers; unexpected exceptions are handled by the request middleware."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
