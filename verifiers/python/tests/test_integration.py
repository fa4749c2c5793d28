"""Both integrations (ASGI middleware on Starlette, FastAPI dependency) behind real uvicorn
servers, with tokens from the real oidc-provider peer, over real HTTP."""

from __future__ import annotations

import time
import uuid

import httpx
import jwt
import pytest
from conftest import BODY, Api, World
from support import AUDIENCE, binding, dpop_proof, jwk_thumbprint, new_ec_key, public_jwk

BEARER_CHALLENGE = 'Bearer error="invalid_token"'
DPOP_CHALLENGE = 'DPoP error="invalid_dpop_proof"'


def send(
    api: Api,
    method: str,
    target: str,
    token: str | None = None,
    *,
    scheme: str = "Bearer",
    body: bytes = BODY,
    headers: list[tuple[str, str]] | None = None,
) -> httpx.Response:
    h = list(headers or [])
    if token is not None:
        h.append(("Authorization", f"{scheme} {token}"))
    return api.http.request(method, api.url(target), content=body, headers=h)


def refused(
    api: Api,
    response: httpx.Response,
    calls_before: int,
    status: int,
    code: str,
    field: str | None = None,
    challenge: str | None = None,
) -> dict:
    """The refusal an API owner would see: status, problem+json, code, field; handler not called."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == f"urn:countersign:problem:{code}"
    assert problem["code"] == code
    assert problem["status"] == status
    assert isinstance(problem["title"], str) and problem["title"]
    assert isinstance(problem["detail"], str) and problem["detail"]
    if field is None:
        assert "field" not in problem
    else:
        assert problem["field"] == field
    assert set(problem) <= {"type", "title", "status", "code", "detail", "field"}
    if status == 401:
        assert response.headers.get_list("www-authenticate") == [challenge or BEARER_CHALLENGE]
    else:
        assert "www-authenticate" not in response.headers
    assert len(api.calls) == calls_before, "the handler was called for a refused request"
    return problem


def accepted(api: Api, response: httpx.Response, calls_before: int, name: str) -> dict:
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["approval_id"] == api.bindings[name]["approval"]
    assert data["subject"] == "alice"
    assert api.calls[calls_before:] == [data["approval_id"]]
    return data


# -- accepted ---------------------------------------------------------------------------------


def test_accepts_the_approved_call_once(api: Api) -> None:
    token = api.tokens["ok"].access_token
    n = len(api.calls)
    data = accepted(api, send(api, "POST", "/shop?x=1", token), n, "ok")
    assert data["body"] == BODY.decode()  # the body reached the handler unchanged
    assert data["scope"] == "product:buy"
    assert data["dpop_jkt"] is None
    # Countersign forwards an approved call once: the second arrival is a replay.
    refused(api, send(api, "POST", "/shop?x=1", token), n + 1, 403, "approval_replayed")


def test_accepts_a_get_with_an_empty_body(api: Api) -> None:
    n = len(api.calls)
    data = accepted(api, send(api, "GET", "/items", api.tokens["get_empty"].access_token, body=b""), n, "get_empty")
    assert data["body"] == ""


def test_target_is_compared_raw_and_refusals_leave_the_approval_usable(api: Api) -> None:
    token = api.tokens["encoded"].access_token
    n = len(api.calls)
    # The same path and query once decoded: not the target on the wire.
    refused(api, send(api, "POST", "/shop/a?q=a%20b", token), n, 403, "binding_mismatch", "target")
    refused(api, send(api, "POST", "/shop/%61?q=a+b", token), n, 403, "binding_mismatch", "target")
    accepted(api, send(api, "POST", "/shop/%61?q=a%20b", token), n, "encoded")


# -- the same token for another call ------------------------------------------------------------

MISMATCHES = {
    "another body": (dict(body=b'{"item":"phone","qty":20}'), "body"),
    "an empty body": (dict(body=b""), "body"),
    "another query": (dict(target="/shop?ref=other"), "target"),
    "no query": (dict(target="/shop"), "target"),
    "query percent-encoded": (dict(target="/shop?ref=%61gent"), "target"),
    "another path": (dict(target="/shop/?ref=agent"), "target"),
    "another method": (dict(method="PUT"), "method"),
    "another host": (dict(headers=[("Host", "shop.example")]), "host"),
    "another port": (dict(headers=[("Host", "127.0.0.1:1")]), "host"),
}


@pytest.mark.parametrize("case", MISMATCHES, ids=list(MISMATCHES))
def test_refuses_the_token_for_another_call(api: Api, case: str) -> None:
    change, field = MISMATCHES[case]
    call = {"method": "POST", "target": "/shop?ref=agent", "body": BODY, "headers": None, **change}
    n = len(api.calls)
    response = send(api, call["method"], call["target"], api.tokens["mismatch"].access_token,
                    body=call["body"], headers=call["headers"])
    refused(api, response, n, 403, "binding_mismatch", field)


def test_host_is_compared_case_insensitively(api: Api, world: World) -> None:
    # A fresh token whose binding spells the host in capitals is issued below via a crafted one.
    entry = binding("POST", "/shop", api.host.upper().replace("127.0.0.1", "LOCALHOST"), BODY)
    token = _crafted(world, entry)
    n = len(api.calls)
    r = send(api, "POST", "/shop", token, headers=[("Host", f"localhost:{api.server.port}")])
    assert r.status_code == 200, r.text
    assert api.calls[n:] == [entry["approval"]]


# -- tokens without the binding, or a wrong version -------------------------------------------


@pytest.mark.parametrize("name", ["unbound", "purchase", "two_entries"])
def test_refuses_a_token_without_exactly_one_binding(api: Api, name: str) -> None:
    n = len(api.calls)
    refused(api, send(api, "POST", "/shop", api.tokens[name].access_token), n, 403, "binding_missing")


def test_refuses_another_binding_version(api: Api) -> None:
    n = len(api.calls)
    r = send(api, "POST", "/shop", api.tokens["version2"].access_token)
    refused(api, r, n, 403, "binding_mismatch", "version")


def test_refuses_a_token_without_the_required_scope(api: Api) -> None:
    token = api.tokens["read_scope"]
    assert token.claims["scope"] == "product:read"
    n = len(api.calls)
    refused(api, send(api, "POST", "/shop", token.access_token), n, 403, "insufficient_scope")


# -- no token, bad tokens ---------------------------------------------------------------------

MISSING = {
    "no Authorization": [],
    "Basic scheme": [("Authorization", "Basic YWxpY2U6c2VjcmV0")],
    "Bearer without token": [("Authorization", "Bearer")],
    "two Authorization headers": "twice",
}


@pytest.mark.parametrize("case", MISSING, ids=list(MISSING))
def test_refuses_a_missing_token(api: Api, case: str) -> None:
    headers = MISSING[case]
    if headers == "twice":
        token = api.tokens["mismatch"].access_token
        headers = [("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")]
    n = len(api.calls)
    refused(api, send(api, "POST", "/shop?ref=agent", headers=headers), n, 401, "token_missing")


def _crafted(world: World, entry: dict, *, key=None, kid=None, alg="RS256", **overrides) -> str:
    now = int(time.time())
    claims = {
        "iss": world.peer.issuer,
        "sub": "alice",
        "aud": AUDIENCE,
        "scope": "product:buy",
        "iat": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
        "authorization_details": [entry],
        **overrides,
    }
    claims = {k: v for k, v in claims.items() if v is not None}
    return world.jwks.sign(claims, key=key, kid=kid, alg=alg)


def _tampered(world: World, api: Api) -> str:
    """A real token whose payload names another call: its signature no longer verifies."""
    token = api.tokens["mismatch"].access_token
    header, _, signature = token.split(".")
    claims = dict(api.tokens["mismatch"].claims)
    claims["authorization_details"] = [binding("POST", "/shop", api.host, BODY)]
    payload = jwt.utils.base64url_encode(jwt.api_jwt.json.dumps(claims).encode()).decode()
    return f"{header}.{payload}.{signature}"


INVALID = {
    "expired": lambda w, a, e: _crafted(w, e, exp=int(time.time()) - 120),
    "not yet valid": lambda w, a, e: _crafted(w, e, nbf=int(time.time()) + 300),
    "wrong issuer": lambda w, a, e: _crafted(w, e, iss="https://evil.example"),
    "wrong audience": lambda w, a, e: _crafted(w, e, aud="https://other.example/api"),
    "no exp": lambda w, a, e: _crafted(w, e, exp=None),
    "no sub": lambda w, a, e: _crafted(w, e, sub=None),
    "sub a number": lambda w, a, e: _crafted(w, e, sub=42),
    "untrusted key": lambda w, a, e: _crafted(w, e, key=new_ec_key(), kid="peer-test-key", alg="ES256"),
    "unknown kid": lambda w, a, e: _crafted(w, e, kid="no-such-key"),
    "tampered real token": lambda w, a, e: _tampered(w, a),
    "HS256": lambda w, a, e: jwt.encode({"iss": w.peer.issuer, "aud": AUDIENCE}, "secret" * 6, algorithm="HS256"),
    "alg none": lambda w, a, e: jwt.encode({"iss": w.peer.issuer, "aud": AUDIENCE}, None, algorithm="none"),
    "not a JWT": lambda w, a, e: "not-a-jwt",
}


@pytest.mark.parametrize("case", INVALID, ids=list(INVALID))
def test_refuses_an_invalid_token(api: Api, world: World, case: str) -> None:
    entry = binding("POST", "/shop", api.host, BODY)
    token = INVALID[case](world, api, entry)
    n = len(api.calls)
    refused(api, send(api, "POST", "/shop", token), n, 401, "token_invalid")


def _without(entry: dict, name: str) -> dict:
    return {k: v for k, v in entry.items() if k != name}


ENTRY_DEFECTS = {
    "no approval": (lambda e: _without(e, "approval"), "binding_missing", None),
    "approval a number": (lambda e: {**e, "approval": 7}, "binding_missing", None),
    "version 2 and no approval": (lambda e: {**_without(e, "approval"), "version": "2"}, "binding_missing", None),
    "no method": (lambda e: _without(e, "method"), "binding_mismatch", "method"),
    "version a number": (lambda e: {**e, "version": 1}, "binding_mismatch", "version"),
    "no body_sha256": (lambda e: _without(e, "body_sha256"), "binding_mismatch", "body"),
}


@pytest.mark.parametrize("case", ENTRY_DEFECTS, ids=list(ENTRY_DEFECTS))
def test_an_entry_field_missing_or_not_a_string(api: Api, world: World, case: str) -> None:
    """Settled details: no string approval is binding_missing, another field is a mismatch on it."""
    edit, code, field = ENTRY_DEFECTS[case]
    token = _crafted(world, edit(binding("POST", "/shop", api.host, BODY)))
    n = len(api.calls)
    problem = refused(api, send(api, "POST", "/shop", token), n, 403, code, field)
    assert problem["title"] == {"binding_missing": "Call binding missing", "binding_mismatch": "Call binding mismatch"}[code]


def test_signing_keys_that_cannot_be_fetched_are_token_invalid(api: Api) -> None:
    """A real token of the peer, checked by a verifier whose JWKS address answers nothing."""
    from countersign_verify import Refusal, Verifier

    token = api.tokens["mismatch"]
    v = Verifier(
        issuer=token.claims["iss"], audience=AUDIENCE, jwks_uri="http://127.0.0.1:9/jwks.json", jwks_timeout=2
    )
    with pytest.raises(Refusal) as r:
        v.verify("POST", "/shop?ref=agent", api.host, {"Authorization": f"Bearer {token.access_token}"}, BODY)
    assert (r.value.status, r.value.code) == (401, "token_invalid")
    assert "could not be fetched" in r.value.detail


def test_a_crafted_token_with_a_trusted_key_is_accepted(api: Api, world: World) -> None:
    """Control for the cases above: only the one defect makes them fail."""
    entry = binding("POST", "/shop", api.host, BODY)
    n = len(api.calls)
    assert send(api, "POST", "/shop", _crafted(world, entry)).status_code == 200
    assert api.calls[n:] == [entry["approval"]]


# -- DPoP -------------------------------------------------------------------------------------


def test_dpop_bound_token_accepted_with_a_fresh_proof(api: Api, world: World) -> None:
    token = api.tokens["dpop_ok"]
    assert token.token_type == "DPoP"
    assert token.claims["cnf"]["jkt"] == jwk_thumbprint(public_jwk(world.dpop_key))
    url = api.url("/shop")
    proof = dpop_proof(world.dpop_key, "POST", url, token.access_token)
    n = len(api.calls)
    r = send(api, "POST", "/shop?dpop=1", token.access_token, scheme="DPoP", headers=[("DPoP", proof)])
    data = accepted(api, r, n, "dpop_ok")
    assert data["dpop_jkt"] == token.claims["cnf"]["jkt"]
    # The same proof again: replayed proof (checked before the approval).
    r = send(api, "POST", "/shop?dpop=1", token.access_token, scheme="DPoP", headers=[("DPoP", proof)])
    refused(api, r, n + 1, 401, "dpop_proof_replayed", challenge=DPOP_CHALLENGE)
    # A fresh proof: the approval itself was used.
    proof = dpop_proof(world.dpop_key, "POST", url, token.access_token)
    r = send(api, "POST", "/shop?dpop=1", token.access_token, scheme="DPoP", headers=[("DPoP", proof)])
    refused(api, r, n + 1, 403, "approval_replayed")


def _proof_cases():
    """name -> (build(world, api, token) -> (scheme, headers), code, field)."""
    def ok(w, a, t, **kw):
        args = {"htm": "POST", "htu": a.url("/shop"), "access_token": t, **kw}
        key = args.pop("key", w.dpop_key)
        return dpop_proof(key, args.pop("htm"), args.pop("htu"), args.pop("access_token"), **args)

    other = new_ec_key()
    return {
        "no proof": (lambda w, a, t: ("DPoP", []), "dpop_proof_missing", None),
        "sent as Bearer with a proof": (lambda w, a, t: ("Bearer", [("DPoP", ok(w, a, t))]), "dpop_proof_missing", None),
        "sent as Bearer without a proof": (lambda w, a, t: ("Bearer", []), "dpop_proof_missing", None),
        "two proofs": (lambda w, a, t: ("DPoP", [("DPoP", ok(w, a, t)), ("DPoP", ok(w, a, t))]), "dpop_proof_missing", None),
        "not a JWT": (lambda w, a, t: ("DPoP", [("DPoP", "garbage")]), "dpop_proof_invalid", "proof"),
        "typ JWT": (lambda w, a, t: ("DPoP", [("DPoP", ok(w, a, t, typ="JWT"))]), "dpop_proof_invalid", "proof"),
        "private jwk": (lambda w, a, t: ("DPoP", [("DPoP", ok(w, a, t, jwk={**public_jwk(w.dpop_key), "d": "AAAA"}))]), "dpop_proof_invalid", "proof"),
        "jwk is not the signer": (lambda w, a, t: ("DPoP", [("DPoP", ok(w, a, t, key=other, jwk=public_jwk(w.dpop_key)))]), "dpop_proof_invalid", "proof"),
        "for another method": (lambda w, a, t: ("DPoP", [("DPoP", ok(w, a, t, htm="GET"))]), "dpop_proof_invalid", "htm"),
        "for another path": (lambda w, a, t: ("DPoP", [("DPoP", ok(w, a, t, htu=a.url("/other")))]), "dpop_proof_invalid", "htu"),
        "for another host": (lambda w, a, t: ("DPoP", [("DPoP", ok(w, a, t, htu=f"http://localhost:{a.server.port}/shop"))]), "dpop_proof_invalid", "htu"),
        "for https": (lambda w, a, t: ("DPoP", [("DPoP", ok(w, a, t, htu=f"https://{a.host}/shop"))]), "dpop_proof_invalid", "htu"),
        "htu with the query": (lambda w, a, t: ("DPoP", [("DPoP", ok(w, a, t, htu=a.url("/shop?dpop=2")))]), "dpop_proof_invalid", "htu"),
        "iat too old": (lambda w, a, t: ("DPoP", [("DPoP", ok(w, a, t, iat=time.time() - 300))]), "dpop_proof_invalid", "iat"),
        "iat in the future": (lambda w, a, t: ("DPoP", [("DPoP", ok(w, a, t, iat=time.time() + 300))]), "dpop_proof_invalid", "iat"),
        "no ath": (lambda w, a, t: ("DPoP", [("DPoP", ok(w, a, t, access_token=None))]), "dpop_proof_invalid", "ath"),
        "ath of another token": (lambda w, a, t: ("DPoP", [("DPoP", ok(w, a, t, access_token=a.tokens["ok"].access_token))]), "dpop_proof_invalid", "ath"),
        "signed by another key": (lambda w, a, t: ("DPoP", [("DPoP", ok(w, a, t, key=other))]), "dpop_proof_invalid", "key"),
    }


PROOF_CASES = _proof_cases()


@pytest.mark.parametrize("case", PROOF_CASES, ids=list(PROOF_CASES))
def test_dpop_bound_token_refused_without_a_good_proof(api: Api, world: World, case: str) -> None:
    build, code, field = PROOF_CASES[case]
    token = api.tokens["dpop_fail"].access_token
    scheme, headers = build(world, api, token)
    n = len(api.calls)
    r = send(api, "POST", "/shop?dpop=2", token, scheme=scheme, headers=headers)
    refused(api, r, n, 401, code, field, challenge=DPOP_CHALLENGE)


def test_dpop_proof_is_spent_even_when_the_call_is_refused(api: Api, world: World) -> None:
    token = api.tokens["dpop_fail"].access_token
    proof = dpop_proof(world.dpop_key, "POST", api.url("/shop"), token)
    n = len(api.calls)
    r = send(api, "POST", "/shop?dpop=2", token, scheme="DPoP", body=b"{}", headers=[("DPoP", proof)])
    refused(api, r, n, 403, "binding_mismatch", "body")
    r = send(api, "POST", "/shop?dpop=2", token, scheme="DPoP", headers=[("DPoP", proof)])
    refused(api, r, n, 401, "dpop_proof_replayed", challenge=DPOP_CHALLENGE)


def test_unbound_token_sent_with_dpop_is_refused(api: Api, world: World) -> None:
    """A DPoP-scheme token that has no cnf.jkt: the proof's key matches no binding."""
    token = api.tokens["unbound"].access_token
    proof = dpop_proof(world.dpop_key, "POST", api.url("/shop"), token)
    n = len(api.calls)
    r = send(api, "POST", "/shop", token, scheme="DPoP", headers=[("DPoP", proof)])
    refused(api, r, n, 401, "dpop_proof_invalid", "key", challenge=DPOP_CHALLENGE)


def test_require_dpop_refuses_a_bearer_token(api: Api) -> None:
    n = len(api.calls)
    r = send(api, "POST", "/strict/buy", api.tokens["mismatch"].access_token)
    refused(api, r, n, 401, "dpop_proof_missing", challenge=DPOP_CHALLENGE)


def test_require_dpop_refuses_an_unbound_token_even_with_a_proof(api: Api, world: World) -> None:
    token = api.tokens["purchase"].access_token
    proof = dpop_proof(world.dpop_key, "POST", api.url("/strict/buy"), token)
    n = len(api.calls)
    r = send(api, "POST", "/strict/buy", token, scheme="DPoP", headers=[("DPoP", proof)])
    refused(api, r, n, 401, "dpop_proof_missing", challenge=DPOP_CHALLENGE)


def test_require_dpop_missing_token_challenges_with_dpop(api: Api) -> None:
    n = len(api.calls)
    r = send(api, "POST", "/strict/buy")
    refused(api, r, n, 401, "token_missing", challenge='DPoP error="invalid_token"')


def test_require_dpop_accepts_a_bound_token(api: Api, world: World) -> None:
    token = api.tokens["strict_ok"].access_token
    proof = dpop_proof(world.dpop_key, "POST", api.url("/strict/buy"), token)
    n = len(api.calls)
    r = send(api, "POST", "/strict/buy", token, scheme="DPoP", headers=[("DPoP", proof)])
    accepted(api, r, n, "strict_ok")
