"""The one place where errors become HTTP responses with OpenAI's error body.

`{"error": {"message", "type", "param", "code"}}`. Typed errors (`common.errors.OmniError`) carry their status;
request validation errors (pydantic, malformed JSON) are 400s naming the field; a full stage queue (Serve's
`BackPressureError`, `deployments.admission`) is a 429 with `Retry-After`; a stage replica that died (Serve restarts
it) is a 503 to retry; anything else is a bug, reported as a 500 without internals. Errors raised inside a stage
replica come back through Ray as an exception that is still an instance of the original class (with its
attributes), so the same mapping applies to them.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from typing import TYPE_CHECKING

from pydantic import ValidationError
from ray.exceptions import RayActorError

from common.errors import OmniError

if TYPE_CHECKING:
    from fastapi.responses import JSONResponse

logger = logging.getLogger("ray.serve")  # Serve writes it to the replica's log, with its request context


class AuthenticationError(OmniError):
    """Missing or wrong API key."""

    status_code = 401
    error_type = "authentication_error"


class RequestTooLargeError(OmniError):
    """The request body is larger than the service takes (`max_request_bytes`)."""

    status_code = 413
    error_type = "invalid_request_error"


class ModelNotFoundError(OmniError):
    """The request names a model this service does not serve."""

    status_code = 404
    error_type = "invalid_request_error"


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name.removesuffix("Error")).lower()


_TYPE_LABELS = {"str", "int", "float", "bool", "none"}


def _param(loc: tuple) -> str:
    """pydantic location → OpenAI's `param` form: ("body", "messages", 0, "content") → messages[0].content.

    Union members show up in pydantic's locations (our tags start with "~", untagged unions use type labels
    such as "str" or "list[str]"); they are not fields, so they are dropped.
    """
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part == "body" or part.startswith("~") or "[" in part or part in _TYPE_LABELS:
            continue
        else:
            text += f".{part}" if text else part
    return text


def validation_error(errors: list[dict]) -> tuple[int, dict]:
    """pydantic/FastAPI errors → one 400 that names every unknown field and every invalid one."""
    unknown = [_param(tuple(e["loc"])) for e in errors if e["type"] == "extra_forbidden"]
    if any(e["type"] == "json_invalid" for e in errors):
        return 400, error_body("request body is not valid JSON", "invalid_request_error", None, "invalid_json")
    if unknown:
        names = ", ".join(unknown)
        return 400, error_body(f"unknown field(s): {names}", "invalid_request_error", unknown[0], "unknown_field")
    lines = dict.fromkeys(f"{_param(tuple(e['loc'])) or 'body'}: {e['msg']}" for e in errors)  # ordered, unique
    param = _param(tuple(errors[0]["loc"])) or None
    return 400, error_body("; ".join(list(lines)[:5]), "invalid_request_error", param, "invalid_value")


def _is(exc: BaseException, module: str, name: str) -> bool:
    """Whether `exc` is an instance of FastAPI's, Starlette's or Serve's class `module.name`, looked up only where
    this process imported that module: the batch job's stage actors map errors here without the HTTP stack, whose
    import costs each of them seconds of CPU at start, and an exception of a module never imported cannot exist."""
    cls = getattr(sys.modules.get(module), name, None)
    return cls is not None and isinstance(exc, cls)


def error_for(exc: BaseException) -> tuple[int, dict]:
    """Any exception → (HTTP status, OpenAI error body)."""
    if isinstance(exc, OmniError):
        if exc.status_code >= 500:  # typed, but the server's fault (e.g. a broken chat template): keep it in the log
            logger.error("%s: %s", type(exc).__name__, exc.message)
        return exc.status_code, error_body(exc.message, exc.error_type, exc.param, _snake(type(exc).__name__))
    if isinstance(exc, ValidationError) or _is(exc, "fastapi.exceptions", "RequestValidationError"):
        return validation_error(list(exc.errors()))
    if _is(exc, "starlette.exceptions", "HTTPException"):
        error_type = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
        return exc.status_code, error_body(str(exc.detail), error_type)
    if _is(exc, "ray.serve.exceptions", "BackPressureError"):  # OpenAI's rate-limit body (the limit is on requests)
        return 429, error_body(f"the service is at capacity; retry after {_retry_after(exc)} s", "requests", None,
                               "rate_limit_exceeded")
    if isinstance(exc, RayActorError):  # a replica died
        logger.warning("stage unavailable: %s", exc)
        return 503, error_body("a stage of the service is unavailable (restarting); retry",
                               "server_error", None, "stage_unavailable")
    logger.exception("unexpected error", exc_info=exc)
    return 500, error_body("internal server error", "server_error", None, "internal_error")


def _retry_after(exc: BaseException) -> int:
    """The refusing deployment's `retry_after_s` in whole seconds, rounded up (`Retry-After` takes no fraction)."""
    return math.ceil(exc.retry_after_s or 0)


def error_response(exc: BaseException) -> JSONResponse:
    from fastapi.responses import JSONResponse

    status, body = error_for(exc)
    headers = None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    elif _is(exc, "ray.serve.exceptions", "BackPressureError"):
        headers = {"Retry-After": str(_retry_after(exc))}
    return JSONResponse(body, status_code=status, headers=headers)
