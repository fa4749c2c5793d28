"""Test plumbing: the oidc-provider peer, a local JWKS, uvicorn servers, tokens, DPoP proofs."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

REPO_ROOT = Path(__file__).resolve().parents[3]
PEER_SCRIPT = REPO_ROOT / "tests" / "peer" / "server.mjs"
AUDIENCE = "https://shop.example/api"


def b64url_sha256(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def binding(method: str, target: str, host: str, body: bytes, approval: str | None = None) -> dict:
    return {
        "type": "countersign_call",
        "version": "1",
        "approval": approval or str(uuid.uuid4()),
        "method": method,
        "target": target,
        "host": host,
        "body_sha256": b64url_sha256(body),
    }


# -- the peer ---------------------------------------------------------------------------------


class Peer:
    """tests/peer/server.mjs (oidc-provider) on an ephemeral port; stops when stdin closes."""

    def __init__(self) -> None:
        if not (PEER_SCRIPT.parent / "node_modules").is_dir():
            raise RuntimeError("run `npm ci --prefix tests/peer` from the repository root first")
        env = dict(os.environ, PEER_PORT="0")
        env.pop("PEER_IGNORE_STDIN", None)
        env.pop("PEER_DPOP_NONCE", None)
        self.proc = subprocess.Popen(
            ["node", str(PEER_SCRIPT)],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            self.proc.kill()
            raise RuntimeError("the peer exited before printing its address")
        info = json.loads(line)
        self.issuer: str = info["issuer"]
        self.jwks_uri = f"{self.issuer}/.well-known/jwks.json"
        self.http = httpx.Client(base_url=self.issuer, timeout=10)

    def close(self) -> None:
        self.http.close()
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001
            self.proc.kill()
            self.proc.wait()


@dataclass
class TokenSpec:
    details: list[dict] | None = None
    scope: str = "openid product:buy"
    dpop_key: ec.EllipticCurvePrivateKey | None = None
    #: who is asked to approve (a user of the peer: alice, bob or carol)
    user: str = "alice"


@dataclass
class Token:
    access_token: str
    token_type: str
    claims: dict[str, Any]


def issue_tokens(peer: Peer, specs: dict[str, TokenSpec]) -> dict[str, Token]:
    """Every token through the real CIBA flow, batched: ask all, approve all, wait once, redeem all."""
    client = {"client_id": "countersign-post", "client_secret": "countersign-secret"}
    pending: dict[str, tuple[str, float]] = {}
    for name, spec in specs.items():
        form = {
            **client,
            "scope": spec.scope,
            "login_hint": spec.user,
            "binding_message": "Buy 2 phones",
            "resource": AUDIENCE,
        }
        if spec.details is not None:
            form["authorization_details"] = json.dumps(spec.details)
        r = peer.http.post("/bc-authorize", data=form)
        r.raise_for_status()
        answer = r.json()
        pending[name] = (answer["auth_req_id"], time.monotonic() + float(answer["interval"]) + 0.1)
        peer.http.post(f"/control/requests/{answer['auth_req_id']}/approve").raise_for_status()
    wait = max(due for _, due in pending.values()) - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    tokens = {}
    for name, (auth_req_id, _) in pending.items():
        spec = specs[name]
        headers = {}
        if spec.dpop_key is not None:
            headers["DPoP"] = dpop_proof(spec.dpop_key, "POST", f"{peer.issuer}/oauth/token")
        r = peer.http.post(
            "/oauth/token",
            data={
                **client,
                "grant_type": "urn:openid:params:grant-type:ciba",
                "auth_req_id": auth_req_id,
            },
            headers=headers,
        )
        if r.status_code != 200:
            raise RuntimeError(f"token request for {name} failed: {r.status_code} {r.text}")
        answer = r.json()
        token = answer["access_token"]
        tokens[name] = Token(token, answer["token_type"], jwt.decode(token, options={"verify_signature": False}))
    return tokens


# -- DPoP -------------------------------------------------------------------------------------


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_jwk(key: Any) -> dict:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return json.loads(ECAlgorithm.to_jwk(key.public_key()))
    return json.loads(RSAAlgorithm.to_jwk(key.public_key()))


def jwk_thumbprint(jwk: dict) -> str:
    members = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}[jwk["kty"]]
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return b64url_sha256(canonical.encode())


def dpop_proof(
    key: ec.EllipticCurvePrivateKey,
    htm: str,
    htu: str,
    access_token: str | None = None,
    *,
    iat: float | None = None,
    jti: str | None = None,
    jwk: dict | None = None,
    typ: str = "dpop+jwt",
    extra: dict | None = None,
) -> str:
    claims: dict[str, Any] = {
        "htm": htm,
        "htu": htu,
        "iat": int(time.time() if iat is None else iat),
        "jti": jti or str(uuid.uuid4()),
    }
    if access_token is not None:
        claims["ath"] = b64url_sha256(access_token.encode("ascii"))
    claims.update(extra or {})
    headers = {"typ": typ, "jwk": jwk if jwk is not None else public_jwk(key)}
    return jwt.encode(claims, key, algorithm="ES256", headers=headers)


# -- a JWKS of our own: the peer's keys plus a test key, for tokens we craft ------------------


class LocalJwks:
    """Serves the peer's JWKS (if given) plus ``key`` (kid ``local-test-key``) over real HTTP,
    each answer ``delay`` seconds late."""

    KID = "local-test-key"

    def __init__(self, peer: Peer | None = None, delay: float = 0.0) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        keys = peer.http.get("/.well-known/jwks.json").json()["keys"] if peer else []
        mine = {**public_jwk(self.key), "kid": self.KID, "use": "sig", "alg": "RS256"}
        self.document = json.dumps({"keys": [*keys, mine]}).encode()
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.fetches += 1
                time.sleep(delay)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(outer.document)))
                self.end_headers()
                self.wfile.write(outer.document)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def sign(self, claims: dict, *, key: Any = None, kid: str | None = None, alg: str = "RS256") -> str:
        return jwt.encode(
            claims,
            key if key is not None else self.key,
            algorithm=alg,
            headers={"kid": kid or self.KID, "typ": "at+jwt"},
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- uvicorn ----------------------------------------------------------------------------------


class UvicornThread:
    """A real uvicorn server for ``app`` on an ephemeral port, in a thread of the test process."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self.base_url = f"http://{self.host}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
        self.sock.close()
