"""Every error the server answers, in one JSON shape: ``{"error", "detail", "body", "errors"}``.

A1111's API answers its errors with these four keys and its clients print ``detail``; here ``detail``
is always one readable sentence naming the field, value or limit, ``errors`` lists the offending
fields of a request that broke the schema (empty otherwise), and ``body`` is always empty: request
bodies can be megabytes of base64 and are never echoed back.
"""
from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from latent_diffusion.server.generate import BadRequest
from latent_diffusion.server.jobs import QueueFull

SHOWN_INPUT_CHARS = 60  # how much of a refused value the message repeats


class ClientGone(Exception):
    """The client closed the connection while its job waited or ran."""


def error_response(status: int, kind: str, detail: str, errors: list[dict[str, Any]] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error answer in the server's one error shape."""
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": kind, "detail": detail, "body": "", "errors": errors or []})


def add_error_handlers(app: FastAPI) -> None:
    """Answer every exception a route may raise in the one shape, with the status it deserves."""

    async def bad_request(request: Request, error: Exception):
        return error_response(400, "BadRequest", str(error))

    for refused in (BadRequest, ValueError, FileNotFoundError):
        app.add_exception_handler(refused, bad_request)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        problems = [field_error(problem) for problem in error.errors()]
        return error_response(422, "ValidationError", "; ".join(describe(problem) for problem in error.errors()),
                              problems)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, error: QueueFull):
        return error_response(429, "QueueFull", f"the server is busy: {error}; retry later")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        headers = dict(error.headers or {})
        if error.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(app, request.url.path))
        return error_response(error.status_code, HTTPStatus(error.status_code).phrase, str(error.detail),
                              headers=headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, error: ClientGone):
        # Nobody reads this answer; 499 is the usual log code for "client closed request".
        return error_response(499, "ClientClosedRequest", f"the client closed the connection of job {error}")

    @app.exception_handler(FloatingPointError)
    async def numeric_failure(request: Request, error: FloatingPointError):
        return error_response(500, "GenerationFailed", str(error))

    @app.exception_handler(Exception)
    async def server_failure(request: Request, error: Exception):
        # A bug of ours, not the client's: still answered in the same shape (and logged by the server).
        return error_response(500, "InternalError", f"the server failed: {type(error).__name__}: {error}")


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    # Starlette names only the first matching route's methods; GET and POST /options are two routes.
    return sorted({method for route in app.routes if getattr(route, "path", None) == path
                   for method in (getattr(route, "methods", None) or ())})


def field_error(problem: dict[str, Any]) -> dict[str, Any]:
    """One schema violation as ``{"loc", "msg", "type"}`` (the refused input is left out: it may be huge)."""
    return {"loc": [str(part) if not isinstance(part, int) else part for part in problem.get("loc", ())],
            "msg": str(problem.get("msg", "")), "type": str(problem.get("type", ""))}


def describe(problem: dict[str, Any]) -> str:
    """One schema violation as a sentence: the field, what is wrong, and the value sent."""
    loc = [part for part in problem.get("loc", ()) if part != "body"]
    if problem.get("type") == "json_invalid":
        reason = (problem.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({reason} at character {loc[0] if loc else 0})"
    if not loc:
        return f"the request body must be a JSON object: {problem.get('msg')}"
    field = ".".join(str(part) for part in loc)
    text = f"{field}: {problem.get('msg')}"
    if problem.get("type") != "missing" and "input" in problem:
        shown = repr(problem["input"])
        if len(shown) > SHOWN_INPUT_CHARS:
            shown = shown[:SHOWN_INPUT_CHARS] + "..."
        text += f" (got {shown})"
    return text
