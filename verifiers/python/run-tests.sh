#!/usr/bin/env bash
# Runs the Python verifier's tests in a virtualenv of its own
# (verifiers/python/.venv, git-ignored), with the pinned test dependencies.
# Needs `npm ci --prefix tests/peer` first: the tests start oidc-provider.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python3 -m venv "$here/.venv"
"$here/.venv/bin/pip" install --quiet --disable-pip-version-check -e "$here[test]"
exec "$here/.venv/bin/pytest" -q "$here" "$@"
