"""FastAPI integration: ``Depends(countersign.require_approval)``.

Needs ``countersign-verify[fastapi]``; the core package never imports FastAPI.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response

from ._core import Approval, Verifier
from ._problem import Refusal, ServerError
from .asgi import request_target, request_url

__all__ = ["Countersign", "CountersignHTTPException", "problem_exception_handler"]


class CountersignHTTPException(HTTPException):
    """A refusal as an HTTPException; :func:`problem_exception_handler` renders it exactly.

    Without that handler FastAPI's default one still refuses the call with the same status and
    headers, the problem document under ``detail``.
    """

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(status_code=refusal.status, detail=refusal.problem, headers=refusal.headers)
        self.refusal = refusal


async def problem_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CountersignHTTPException)
    return Response(
        content=exc.refusal.body(), status_code=exc.refusal.status, headers=exc.refusal.headers
    )


class Countersign:
    """Holds a :class:`Verifier`; ``require_approval`` is the dependency.

    ``Countersign(app=app, issuer=..., audience=..., jwks_uri=...)`` (or ``.install(app)``)
    registers the handler that renders refusals as ``application/problem+json``.
    """

    def __init__(
        self, verifier: Verifier | None = None, *, app: FastAPI | None = None, **options: Any
    ) -> None:
        self.verifier = verifier if verifier is not None else Verifier(**options)
        if app is not None:
            self.install(app)

    def install(self, app: FastAPI) -> None:
        app.add_exception_handler(CountersignHTTPException, problem_exception_handler)

    async def require_approval(self, request: Request) -> Approval:
        """Verify the request; return its :class:`Approval` or raise :class:`CountersignHTTPException`."""
        try:
            target = request_target(request.scope)
            limit = self.verifier.max_body_bytes
            length = request.headers.get("content-length", "")
            if length.strip().isdigit() and int(length) > limit:
                raise Refusal("body_too_large", f"The request body exceeds {limit} bytes.")
            try:
                body = await request.body()
            except RuntimeError:  # the stream was consumed (form parsing) before us
                raise ServerError(
                    "The request body was consumed before it could be verified (form fields?); "
                    "use CountersignMiddleware for such routes."
                ) from None
            if len(body) > limit:
                raise Refusal("body_too_large", f"The request body exceeds {limit} bytes.")
            approval = await self.verifier.verify_async(
                request.method, target, None, request.headers, body,
                request_url(request.scope, target),
            )
        except Refusal as refusal:
            raise CountersignHTTPException(refusal) from None
        request.state.countersign = approval
        return approval
