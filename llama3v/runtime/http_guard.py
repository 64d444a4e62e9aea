"""The server's checks before a request reaches an endpoint, as plain ASGI middleware, and a header deadline.

A web page the user visits can send requests to a server on the user's own machine. Three checks stop
it: an allowed `Host` (a page that rebinds its own name to 127.0.0.1 still sends its name, so it cannot
read answers), `Content-Type: application/json` on POSTs (a browser sends that cross-site only after a
CORS preflight, which this server never grants), and, where configured, the API key. Plain ASGI rather
than Starlette's BaseHTTPMiddleware: that wrapper hides a client's disconnect from the endpoint, so an
abandoned request would keep the model busy.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("llama3v.server")
Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


@dataclass(frozen=True)
class GuardPolicy:
    """What the middleware lets through."""

    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ()  # names besides IP literals and localhost; "*" allows any
    max_body_bytes: int = 64 << 20
    public: Callable[[str], bool] = lambda path: path == "/health"  # paths served without the API key


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether a request's Host header names this server: an IP literal, localhost, or an allowed name.

    DNS rebinding needs a name the attacker controls, so IP literals are safe; other names must be listed."""
    if not host or "*" in allowed:
        return True
    if host.startswith("["):  # [v6] or [v6]:port
        name = host[1:host.find("]")] if "]" in host else host
    else:
        name = host.split(":")[0] if host.count(":") == 1 else host
    name = name.lower().rstrip(".")
    if name == "localhost" or name in {a.lower() for a in allowed}:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def error_body(status: int, message: str, kind: str = "invalid_request_error") -> bytes:
    """The JSON error object of an OpenAI-style error response."""
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


class Guard:
    """ASGI middleware: Host, API key, Content-Type and Content-Length checks, and one log line per request."""

    def __init__(self, app: Callable, policy: GuardPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [0]

        async def send_logged(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        refusal = self.check(scope)
        if refusal:
            await _respond(send_logged, *refusal)
        else:
            await self.app(scope, receive, send_logged)
        log.info(json.dumps({"event": "request", "method": scope["method"], "path": scope["path"],
                             "status": status[0], "ms": round((time.perf_counter() - started) * 1e3)}))

    def check(self, scope: Scope) -> tuple[int, str, str] | None:
        """(status, message, error type) when the request is refused, else None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        p = self.policy
        if not host_allowed(headers.get("host", ""), p.allowed_hosts):
            return 403, "this server does not answer to that Host name (start it with --allowed-host NAME)", \
                "invalid_request_error"
        if p.api_key and not p.public(scope["path"]) and headers.get("authorization", "") != f"Bearer {p.api_key}":
            return 401, "missing or wrong API key", "authentication_error"
        if scope["method"] == "POST":
            media_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "application/json":
                return 415, "POST bodies must be sent as Content-Type: application/json", "invalid_request_error"
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > p.max_body_bytes):
            return 413, f"request body over the {p.max_body_bytes >> 20} MiB limit", "invalid_request_error"
        return None


async def _respond(send: Send, status: int, message: str, kind: str) -> None:
    body = error_body(status, message, kind)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def header_deadline_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request headers take longer than `seconds` to arrive
    (uvicorn has no such limit: a client that trickles its headers would hold a connection for ever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # noqa: ANN001 - asyncio's transport
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self._header_timer is not None and self.cycle is not None and not self.cycle.response_complete:
                self._header_timer.cancel()  # a request's headers are complete: it is running
                self._header_timer = None

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._arm()  # for the next request's headers; before super(), which may start a pipelined one
            super().on_response_complete()

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(seconds, self._headers_late)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _headers_late(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline
