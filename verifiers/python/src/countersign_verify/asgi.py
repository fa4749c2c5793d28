"""Pure ASGI middleware: verifies every HTTP request before the app sees it."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from ._core import Verifier
from ._problem import Refusal, ServerError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def request_target(scope: Scope) -> bytes:
    """The raw request-target (origin form) from ``raw_path`` and ``query_string``.

    Raises :class:`ServerError` when the server gives no ``raw_path``: the decoded ``path`` is
    never re-encoded into a target, as that could match a binding the wire did not.
    """
    raw_path = scope.get("raw_path")
    if not isinstance(raw_path, bytes | bytearray) or not raw_path:
        raise ServerError(
            "The ASGI server does not provide raw_path, so the raw request-target cannot be "
            "checked against the call binding; use a server that does (e.g. uvicorn, hypercorn)."
        )
    raw_path = bytes(raw_path)
    if b"?" in raw_path:  # some servers put the whole target in raw_path
        return raw_path
    query = scope.get("query_string") or b""
    return raw_path + b"?" + bytes(query) if query else raw_path


def request_url(scope: Scope, target: bytes) -> str | None:
    """scheme://host/path of the request, for DPoP ``htu`` (the Host header, else ``server``)."""
    host = None
    for name, value in scope.get("headers") or ():
        if name.lower() == b"host":
            host = value.decode("latin-1")
            break
    if host is None:
        server = scope.get("server")
        if not server or server[1] is None:
            return None
        host = f"{server[0]}:{server[1]}"
    scheme = scope.get("scheme") or "http"
    path = target.split(b"?", 1)[0].decode("latin-1")
    return f"{scheme}://{host}{path}"


async def send_refusal(send: Send, refusal: Refusal) -> None:
    body = refusal.body()
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in refusal.headers.items()]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class CountersignMiddleware:
    """Wraps an ASGI app; a refused call gets the problem+json and never reaches the app.

    An accepted call reaches the app with the :class:`~countersign_verify.Approval` in
    ``scope["countersign"]`` and ``scope["state"]["countersign"]`` (``request.state.countersign``
    in Starlette / FastAPI), and its body replayed unchanged.
    """

    def __init__(self, app: ASGIApp, verifier: Verifier | None = None, **options: Any) -> None:
        self.app = app
        self.verifier = verifier if verifier is not None else Verifier(**options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            # A WebSocket has no body to bind: refuse rather than let it past unverified.
            await send({"type": "websocket.close", "code": 1008})
            return
        if kind != "http":
            await self.app(scope, receive, send)
            return
        try:
            target = request_target(scope)
        except Refusal as refusal:
            await send_refusal(send, refusal)
            return

        limit = self.verifier.max_body_bytes
        for name, value in scope.get("headers") or ():
            if name.lower() == b"content-length" and value.strip().isdigit() and int(value) > limit:
                await send_refusal(send, _too_large(limit))
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await send_refusal(send, _too_large(limit))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)

        try:
            approval = await self.verifier.verify_async(
                scope["method"], target, None, scope.get("headers") or [], body,
                request_url(scope, target),
            )
        except Refusal as refusal:
            await send_refusal(send, refusal)
            return

        scope["countersign"] = approval
        state = scope.setdefault("state", {})
        state["countersign"] = approval

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _too_large(limit: int) -> Refusal:
    return Refusal("body_too_large", f"The request body exceeds {limit} bytes.")
