"""What every request must pass before any route: a Host the server answers to, credentials, a bounded body.

A plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``), so that handlers still see their
client's disconnect.
"""
from __future__ import annotations

import base64
import binascii
import secrets

from starlette.datastructures import Headers

from latent_diffusion.server.errors import error_response

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
EVERY_INTERFACE = ("0.0.0.0", "::", "")


def allowed_host_names(bind_host: str, extra: list[str] | tuple[str, ...] = ()) -> frozenset[str] | None:
    """The names a request's ``Host`` may give, or None for any (a server listening on every interface).

    A server bound to one address answers only to the names of that address: a web page elsewhere can
    point its own domain at 127.0.0.1 (DNS rebinding), and its requests then carry that domain.
    """
    if bind_host in EVERY_INTERFACE:
        return None
    return frozenset({*LOOPBACK_NAMES, *(host_name(name) for name in (bind_host, *extra))})


def host_name(host: str) -> str:
    """``Host`` header or address -> the bare lower-case name (port and trailing dot dropped, IPv6 in brackets)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    if host.count(":") > 1:  # a bare IPv6 address such as ::1
        return f"[{host}]"
    return host.partition(":")[0].rstrip(".")


def authorised(header: str, credentials: list[str]) -> bool:
    """Whether an ``Authorization`` header (Basic, or Bearer user:password) names one of ``credentials``."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            given = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() == "bearer":
        given = value
    else:
        return False
    # Compare against every pair so that timing does not tell which user exists.
    return any([secrets.compare_digest(given.encode(), c.encode()) for c in credentials])


class GateMiddleware:
    """Refuses a foreign ``Host`` (400), missing credentials (401) and a body over the limit (413)."""

    def __init__(self, app, credentials: list[str], max_body_bytes: int, allowed_hosts: frozenset[str] | None) -> None:
        self.app, self.credentials, self.max_body_bytes = app, credentials, max_body_bytes
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self.refusal(headers)
        if refusal is None and "content-length" not in headers:
            # A chunked body announces no length: read it here, counting, before any route sees it.
            receive, refusal = await self.bounded_body(receive)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, headers: Headers):
        """The answer to a request refused on its headers alone, or None."""
        host = headers.get("host")
        if self.allowed_hosts is not None and host is not None and host_name(host) not in self.allowed_hosts:
            return error_response(400, "BadHost", f"this server does not answer to the host name {host!r}; it "
                                  f"answers to {', '.join(sorted(self.allowed_hosts))} (serve other names with "
                                  "--listen or --allow-host)")
        if self.credentials and not authorised(headers.get("authorization", ""), self.credentials):
            return error_response(401, "Unauthorized", "this server needs credentials (user:password, HTTP Basic)",
                                  headers={"WWW-Authenticate": 'Basic realm="ldm"'})
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            return self.too_large()
        return None

    def too_large(self):
        return error_response(413, "PayloadTooLarge",
                              f"the request body exceeds this server's limit of {self.max_body_bytes} bytes")

    async def bounded_body(self, receive):
        """Read the whole body (up to the limit) and hand it on as one message; later messages pass through."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _replay([message], receive), None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return receive, self.too_large()
            if not message.get("more_body", False):
                break
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive), None


def _replay(messages: list[dict], receive):
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()

    return replayed
