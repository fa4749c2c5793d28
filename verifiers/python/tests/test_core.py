"""The core Verifier and the middleware's edges, without the peer (own keys, own JWKS server)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import pytest
from support import LocalJwks, b64url_sha256, binding, dpop_proof, jwk_thumbprint, new_ec_key, public_jwk

from countersign_verify import CountersignMiddleware, Refusal, Verifier, jwk_thumbprint as lib_thumbprint
from countersign_verify._cache import SeenCache

ISSUER = "https://as.example"
AUDIENCE = "https://shop.example/api"
BODY = b'{"item":"phone"}'


@pytest.fixture(scope="module")
def jwks():
    server = LocalJwks()
    yield server
    server.close()


def token(jwks: LocalJwks, entry: dict | None, **extra) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": [AUDIENCE, "other"], "sub": "alice", "scope": "product:buy",
              "iat": now, "exp": now + 60, **extra}
    if entry is not None:
        claims["authorization_details"] = [entry]
    return jwks.sign(claims)


def make(jwks: LocalJwks, **options) -> Verifier:
    return Verifier(issuer=ISSUER, audience=AUDIENCE, jwks_uri=jwks.uri, required_scopes="product:buy", **options)


def test_rfc7638_thumbprint_example() -> None:
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
        "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQ"
        "MicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRw"
        "r3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert lib_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


HEADER_FORMS = {
    "dict": lambda t: {"Authorization": f"Bearer {t}", "Host": "shop.example"},
    "pairs of bytes (ASGI)": lambda t: [(b"authorization", f"Bearer {t}".encode()), (b"host", b"shop.example")],
    "dict of lists": lambda t: {"authorization": [f"Bearer {t}"], "host": ["shop.example"]},
}


@pytest.mark.parametrize("form", HEADER_FORMS, ids=list(HEADER_FORMS))
def test_sync_verify_accepts_and_names_the_approval(jwks: LocalJwks, form: str) -> None:
    entry = binding("POST", "/shop?a=1", "Shop.Example", BODY)
    t = token(jwks, entry)
    approval = make(jwks).verify("POST", b"/shop?a=1", None, HEADER_FORMS[form](t), BODY)
    assert approval.subject == "alice"
    assert approval.approval_id == entry["approval"]
    assert approval.binding == entry
    assert approval.claims["scope"] == "product:buy"


def test_configured_host_replaces_the_host_header(jwks: LocalJwks) -> None:
    entry = binding("POST", "/shop", "shop.example", BODY)
    t = token(jwks, entry)
    v = make(jwks, host="shop.example")
    headers = {"Authorization": f"Bearer {t}", "Host": "10.0.0.7:8080"}
    assert v.verify("POST", "/shop", None, headers, BODY).approval_id == entry["approval"]
    with pytest.raises(Refusal) as refusal:
        make(jwks).verify("POST", "/shop", None, headers, BODY)
    assert (refusal.value.code, refusal.value.field) == ("binding_mismatch", "host")


def test_empty_body_digest_is_the_documented_one() -> None:
    assert b64url_sha256(b"") == "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"


def test_checks_run_in_the_documented_order(jwks: LocalJwks) -> None:
    """A token wrong in every way is refused for the first check that fails."""
    entry = {**binding("PUT", "/other", "other.example", b"x"), "version": "2"}
    v = make(jwks)

    def code(t: str, **kw) -> tuple[str, str | None, int]:
        with pytest.raises(Refusal) as r:
            v.verify("POST", "/shop", "shop.example", {"Authorization": f"Bearer {t}", **kw}, BODY, "http://shop.example/shop")
        return r.value.code, r.value.field, r.value.status

    now = int(time.time())
    assert code(token(jwks, entry, exp=now - 100, scope="")) == ("token_invalid", None, 401)
    assert code(token(jwks, entry, scope="product:read")) == ("insufficient_scope", None, 403)
    assert code(token(jwks, entry, cnf={"jkt": "x"})) == ("dpop_proof_missing", None, 401)
    assert code(token(jwks, entry)) == ("binding_mismatch", "version", 403)
    assert code(token(jwks, {**entry, "version": "1"})) == ("binding_mismatch", "method", 403)
    assert code(token(jwks, {**entry, "version": "1", "method": "POST"})) == ("binding_mismatch", "target", 403)
    e = {**entry, "version": "1", "method": "POST", "target": "/shop"}
    assert code(token(jwks, e)) == ("binding_mismatch", "host", 403)
    assert code(token(jwks, {**e, "host": "SHOP.example"})) == ("binding_mismatch", "body", 403)
    assert code(token(jwks, {**e, "host": "SHOP.example", "approval": ""})) == ("binding_missing", None, 403)


def test_dpop_htu_normalisation_and_external_url(jwks: LocalJwks) -> None:
    key = new_ec_key()
    jkt = jwk_thumbprint(public_jwk(key))
    assert lib_thumbprint(public_jwk(key)) == jkt

    def attempt(v: Verifier, htu: str, url: str | None) -> str:
        entry = binding("GET", "/items?page=2", "api.example", b"")
        t = token(jwks, entry, cnf={"jkt": jkt})
        headers = {"Authorization": f"DPoP {t}", "DPoP": dpop_proof(key, "GET", htu, t), "Host": "api.example"}
        try:
            return v.verify("GET", "/items?page=2", None, headers, b"", url).approval_id and "ok"
        except Refusal as r:
            return f"{r.code}:{r.field}"

    v = make(jwks)
    assert attempt(v, "HTTPS://API.Example:443/items", "https://api.example/items?page=2") == "ok"
    assert attempt(v, "https://api.example/items", "https://api.example:443/items") == "ok"
    assert attempt(v, "https://api.example/items#frag", "https://api.example/items") == "dpop_proof_invalid:htu"
    assert attempt(v, "https://api.example/Items", "https://api.example/items") == "dpop_proof_invalid:htu"
    assert attempt(v, "http://api.example/items", "https://api.example/items") == "dpop_proof_invalid:htu"
    behind = make(jwks, external_url="https://public.example/")
    assert attempt(behind, "https://public.example/items", "http://10.0.0.7:8080/items") == "ok"
    assert attempt(behind, "http://10.0.0.7:8080/items", "http://10.0.0.7:8080/items") == "dpop_proof_invalid:htu"


def test_seen_cache_is_atomic_and_expires() -> None:
    cache = SeenCache()
    wins = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        wins.append(cache.add("approval", time.time() + 60))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]
    now = time.time()
    assert cache.add("short", now + 5, now)
    assert not cache.add("short", now + 5, now + 4)
    assert cache.add("short", now + 20, now + 6)  # expired, then seen anew


# -- async: the JWKS fetch stays off the event loop, and fails closed ---------------------------


def test_jwks_fetch_does_not_block_the_event_loop() -> None:
    slow = LocalJwks(delay=0.5)
    try:
        entry = binding("POST", "/shop", "shop.example", BODY)
        t = token(slow, entry)
        v = make(slow)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        async def main():
            task = asyncio.create_task(ticker())
            approval = await v.verify_async("POST", "/shop", "shop.example", {"authorization": f"Bearer {t}"}, BODY)
            task.cancel()
            return approval

        approval = asyncio.run(main())
        assert approval.approval_id == entry["approval"]
        assert slow.fetches == 1
        assert ticks >= 10, f"the event loop was blocked during the JWKS fetch ({ticks} ticks)"
    finally:
        slow.close()


def test_unreachable_jwks_fails_closed_with_token_invalid(jwks: LocalJwks) -> None:
    """Contract, settled details: keys that cannot be fetched are token_invalid, the detail says so."""
    v = Verifier(issuer=ISSUER, audience=AUDIENCE, jwks_uri="http://127.0.0.1:9/jwks.json", jwks_timeout=2)
    t = token(jwks, binding("POST", "/shop", "shop.example", BODY))
    for scheme, challenge in (("Bearer", 'Bearer error="invalid_token"'), ("DPoP", 'DPoP error="invalid_token"')):
        with pytest.raises(Refusal) as r:
            asyncio.run(v.verify_async("POST", "/shop", "shop.example", {"authorization": f"{scheme} {t}"}, BODY))
        assert r.value.status == 401
        assert r.value.problem["code"] == "token_invalid"
        assert r.value.problem["title"] == "Access token invalid"
        assert "could not be fetched" in r.value.problem["detail"]
        assert r.value.headers["WWW-Authenticate"] == challenge


CONTRACT_TITLES = {
    "token_missing": "Access token missing",
    "token_invalid": "Access token invalid",
    "insufficient_scope": "Insufficient scope",
    "dpop_proof_missing": "DPoP proof missing",
    "dpop_proof_invalid": "DPoP proof invalid",
    "dpop_proof_replayed": "DPoP proof replayed",
    "binding_missing": "Call binding missing",
    "binding_mismatch": "Call binding mismatch",
    "approval_replayed": "Approval replayed",
    "countersign_missing": "Countersignatures missing",
    "countersign_invalid": "Countersignature invalid",
    "countersign_insufficient": "Too few countersigners",
    "body_too_large": "Request body too large",
}


def test_titles_are_exactly_the_contracts() -> None:
    from countersign_verify._problem import CODES

    assert {code: title for code, (_, title) in CODES.items()} == CONTRACT_TITLES
    for code, title in CONTRACT_TITLES.items():
        assert Refusal(code, "d").problem["title"] == title


# -- the middleware's edges, called directly as ASGI ----------------------------------------------


def run_asgi(app, scope: dict, chunks: list[bytes]) -> tuple[int | None, dict, bytes, list[dict]]:
    inbox = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive():
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers = {k.decode(): v.decode() for k, v in start["headers"]} if start else {}
    return (start["status"] if start else None), headers, body, sent


def http_scope(jwks_token: str | None, raw_path: bytes | None = b"/shop", query: bytes = b"") -> dict:
    scope = {
        "type": "http", "method": "POST", "scheme": "http", "path": "/shop", "query_string": query,
        "headers": [(b"host", b"shop.example")]
        + ([(b"authorization", f"Bearer {jwks_token}".encode())] if jwks_token else []),
        "server": ("127.0.0.1", 80),
    }
    if raw_path is not None:
        scope["raw_path"] = raw_path
    return scope


def recording_app(seen: list):
    async def app(scope, receive, send):
        message = await receive()
        seen.append((scope, message))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def test_middleware_without_raw_path_fails_closed(jwks: LocalJwks) -> None:
    seen: list = []
    entry = binding("POST", "/shop", "shop.example", BODY)
    app = CountersignMiddleware(recording_app(seen), make(jwks))
    status, headers, body, _ = run_asgi(app, http_scope(token(jwks, entry), raw_path=None), [BODY])
    assert status == 500
    assert headers["content-type"] == "application/problem+json"
    assert "raw_path" in json.loads(body)["detail"]
    assert seen == []


def test_middleware_replays_a_chunked_body_and_sets_state(jwks: LocalJwks) -> None:
    seen: list = []
    entry = binding("POST", "/shop?a=%2F", "shop.example", BODY)
    app = CountersignMiddleware(recording_app(seen), make(jwks))
    status, _, _, _ = run_asgi(app, http_scope(token(jwks, entry), query=b"a=%2F"), [BODY[:5], BODY[5:]])
    assert status == 200
    scope, message = seen[0]
    assert message == {"type": "http.request", "body": BODY, "more_body": False}
    assert scope["countersign"].approval_id == entry["approval"]
    assert scope["state"]["countersign"] is scope["countersign"]


def test_middleware_refuses_a_body_over_the_limit(jwks: LocalJwks) -> None:
    seen: list = []
    app = CountersignMiddleware(recording_app(seen), make(jwks, max_body_bytes=8))
    status, headers, body, _ = run_asgi(app, http_scope("x"), [b"12345", b"67890"])
    assert status == 413
    problem = json.loads(body)
    assert problem["code"] == "body_too_large"
    assert problem["type"] == "urn:countersign:problem:body_too_large"
    assert problem["title"] == "Request body too large"
    assert "www-authenticate" not in headers
    assert seen == []


def test_middleware_closes_websockets_and_passes_lifespan(jwks: LocalJwks) -> None:
    seen: list = []

    async def inner(scope, receive, send):
        seen.append(scope["type"])

    app = CountersignMiddleware(inner, make(jwks))
    sent: list = []

    async def send(m):
        sent.append(m)

    async def receive():
        return {"type": "websocket.connect"}

    asyncio.run(app({"type": "websocket", "path": "/ws", "headers": []}, receive, send))
    asyncio.run(app({"type": "lifespan"}, receive, send))
    assert sent == [{"type": "websocket.close", "code": 1008}]
    assert seen == ["lifespan"]


def test_the_core_does_not_import_fastapi_or_starlette() -> None:
    code = "import sys, countersign_verify; print(sorted(m for m in ('fastapi', 'starlette') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_refusal_problem_document_shape() -> None:
    r = Refusal("binding_mismatch", "The token was approved for another body.", field="body")
    assert r.status == 403
    assert json.loads(r.body()) == {
        "type": "urn:countersign:problem:binding_mismatch",
        "title": r.problem["title"],
        "status": 403,
        "code": "binding_mismatch",
        "detail": "The token was approved for another body.",
        "field": "body",
    }
    assert "WWW-Authenticate" not in r.headers
    assert Refusal("token_missing", "x").headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert Refusal("dpop_proof_replayed", "x").headers["WWW-Authenticate"] == 'DPoP error="invalid_dpop_proof"'


def test_fastapi_refuses_even_without_the_problem_handler(jwks: LocalJwks) -> None:
    """Forgetting ``install(app)`` still refuses (FastAPI's default handler, same status and headers)."""
    import httpx
    from fastapi import Depends, FastAPI

    from countersign_verify.fastapi import Countersign

    app = FastAPI()
    countersign = Countersign(make(jwks))
    called = []

    @app.post("/shop")
    async def shop(approval=Depends(countersign.require_approval)):
        called.append(approval)

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://shop.example") as client:
            return await client.post("/shop", content=BODY)

    r = asyncio.run(call())
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert r.json()["detail"]["code"] == "token_missing"
    assert called == []
