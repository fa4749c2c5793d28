#!/usr/bin/env bash
# Installs the Kubernetes manifests' schema checker, kubernetes-validate (the
# PyPI package, which bundles the Kubernetes OpenAPI schemas, so checking
# needs no cluster and no network), into tests/kubernetes/.venv (git-ignored)
# from the pinned, hashed requirements.txt beside this script.
# tests/deploy.rs runs tests/kubernetes/.venv/bin/kubernetes-validate and
# fails without it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python3 -m venv "$here/.venv"
"$here/.venv/bin/pip" install --quiet --disable-pip-version-check \
  --require-hashes --only-binary=:all: -r "$here/requirements.txt"
"$here/.venv/bin/kubernetes-validate" --version
