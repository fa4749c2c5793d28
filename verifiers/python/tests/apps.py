"""The two APIs under test: a Starlette app behind the ASGI middleware, and a FastAPI app."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from countersign_verify import Approval, CountersignMiddleware, Verifier
from countersign_verify.fastapi import Countersign

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def describe(approval: Approval, body: bytes, calls: list[str]) -> dict[str, Any]:
    calls.append(approval.approval_id)
    return {
        "subject": approval.subject,
        "approval_id": approval.approval_id,
        "scope": approval.claims.get("scope"),
        "dpop_jkt": approval.dpop_jkt,
        "countersigners": approval.countersigners,
        "body": body.decode("utf-8", "replace"),
    }


def verifier(jwks_uri: str, issuer: str, audience: str, **extra: Any) -> Verifier:
    return Verifier(
        issuer=issuer,
        audience=audience,
        jwks_uri=jwks_uri,
        required_scopes=["product:buy"],
        **extra,
    )


def asgi_app(calls: list[str], jwks_uri: str, issuer: str, audience: str, **options: Any) -> Any:
    """Plain Starlette app; ``/strict/...`` is served by a second middleware requiring DPoP.
    ``options`` go to the verifier of the other paths."""

    async def handler(request: Request) -> JSONResponse:
        approval = request.state.countersign
        assert request.scope["countersign"] is approval
        return JSONResponse(describe(approval, await request.body(), calls))

    inner = Starlette(routes=[Route("/{path:path}", handler, methods=METHODS)])
    normal = CountersignMiddleware(inner, verifier(jwks_uri, issuer, audience, **options))
    strict = CountersignMiddleware(inner, verifier(jwks_uri, issuer, audience, require_dpop=True))

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("raw_path", b"").startswith(b"/strict/"):
            await strict(scope, receive, send)
        else:
            await normal(scope, receive, send)

    return app


def fastapi_app(calls: list[str], jwks_uri: str, issuer: str, audience: str, **options: Any) -> FastAPI:
    """``options`` go to the verifier of the paths other than ``/strict/...``."""
    app = FastAPI()
    countersign = Countersign(verifier(jwks_uri, issuer, audience, **options), app=app)
    strict = Countersign(verifier(jwks_uri, issuer, audience, require_dpop=True), app=app)

    @app.api_route("/strict/{path:path}", methods=METHODS)
    async def strict_route(
        request: Request, approval: Approval = Depends(strict.require_approval)
    ) -> dict:
        return describe(approval, await request.body(), calls)

    @app.api_route("/{path:path}", methods=METHODS)
    async def route(request: Request, approval: Approval = Depends(countersign.require_approval)) -> dict:
        assert request.state.countersign is approval
        return describe(approval, await request.body(), calls)

    return app
