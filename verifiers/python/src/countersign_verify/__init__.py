"""Countersign call binding verifier (docs/call-binding.md, version 1).

The core (:class:`Verifier`) and the ASGI middleware depend on PyJWT only; the FastAPI
dependency lives in :mod:`countersign_verify.fastapi` (extra ``countersign-verify[fastapi]``).
"""

from ._core import ASYMMETRIC_ALGS, Approval, Verifier, b64url_sha256, jwk_thumbprint
from ._problem import PROBLEM_CONTENT_TYPE, Refusal, ServerError
from .asgi import CountersignMiddleware

__all__ = [
    "ASYMMETRIC_ALGS",
    "Approval",
    "CountersignMiddleware",
    "PROBLEM_CONTENT_TYPE",
    "Refusal",
    "ServerError",
    "Verifier",
    "b64url_sha256",
    "jwk_thumbprint",
]
__version__ = "0.1.0"
