"""Server errors and their HTTP status: the one place that maps one onto the other."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class ServerError(Exception):
    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidInputError(ServerError):
    status_code = 400
    error_type = "invalid_request_error"


class UnauthorizedError(ServerError):
    status_code = 401
    error_type = "authentication_error"


class ModelNotFoundError(ServerError):
    status_code = 404
    error_type = "not_found_error"


class PayloadTooLargeError(ServerError):
    status_code = 413
    error_type = "invalid_request_error"


class TooManyRequestsError(ServerError):
    """The bounded queue is full; ``retry_after`` seconds go into the Retry-After header."""

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InjectedFaultError(ServerError):
    """An error answered on purpose (``faults.errorRate``)."""

    error_type = "injected_fault"


class ModelNotReadyError(ServerError):
    status_code = 503
    error_type = "model_not_ready"


class RequestTimeoutError(ServerError):
    status_code = 504
    error_type = "timeout"


class ArtifactError(Exception):
    """The artifact cannot be served (manifest mismatch, missing files); the message names the file."""


class QualityGateError(Exception):
    """Compression made the model worse than the configured bound; the server stays not ready."""


def error_body(message: str, error_type: str, param: str | None) -> dict[str, object]:
    # OpenAI's error shape, so the official client raises the matching exception with this message.
    return {"error": {"message": message, "type": error_type, "param": param, "code": None}}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    async def _server_error(_: Request, exc: ServerError) -> JSONResponse:
        headers = None
        if isinstance(exc, UnauthorizedError):
            headers = {"WWW-Authenticate": "Bearer"}
        elif isinstance(exc, TooManyRequestsError):
            headers = {"Retry-After": str(exc.retry_after)}
        return JSONResponse(
            error_body(exc.message, exc.error_type, exc.param), exc.status_code, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            position = first.get("loc", ("body", "?"))[-1]
            cause = first.get("ctx", {}).get("error", "invalid")
            message = f"body: malformed JSON ({cause} at character {position})"
            return JSONResponse(error_body(message, "invalid_request_error", "body"), 400)
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{field}: {first.get('msg', 'invalid value')}"
        return JSONResponse(error_body(message, "invalid_request_error", field or None), 400)
