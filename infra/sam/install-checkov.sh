#!/usr/bin/env bash
# Install checkov (the IaC security scanner tests/infra runs on template.yaml) into its own
# virtual environment (.venv-checkov at the repo root).
#
# Kept apart from .venv and .venv-sam on purpose: checkov pins its own boto3, cfn-lint-free
# CloudFormation parser, networkx, packaging and a hundred more packages at versions that
# conflict with moto, the SAM CLI and the project's pins.
#
# Reproducible: checkov-requirements.txt pins checkov and every package it pulls in (made with
# `pip freeze` after a clean install; regenerate the same way when bumping checkov).
# Idempotent: a stamp file holds the hash of that lock; nothing happens while it matches and
# .venv-checkov/bin/checkov exists.
# Environment overrides:
#   CHECKOV_VENV   target venv (default: <repo>/.venv-checkov)
#   PYTHON         interpreter used to create the venv (default: python3)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CHECKOV_VENV="${CHECKOV_VENV:-$REPO_ROOT/.venv-checkov}"
REQUIREMENTS="$REPO_ROOT/infra/sam/checkov-requirements.txt"
PYTHON="${PYTHON:-python3}"
STAMP="$CHECKOV_VENV/.installed-stamp"

want="$(sha256sum "$REQUIREMENTS" | awk '{print $1}')"
if [ -x "$CHECKOV_VENV/bin/checkov" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    echo "checkov (locked by $(basename "$REQUIREMENTS")) already installed in $CHECKOV_VENV"
    exit 0
fi

echo "Installing $REQUIREMENTS into $CHECKOV_VENV (with $("$PYTHON" --version 2>&1))"
rm -f "$STAMP"
"$PYTHON" -m venv "$CHECKOV_VENV"
"$CHECKOV_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
# --no-deps: the lock lists the whole tree, so pip does no resolution (fast, no drift).
"$CHECKOV_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    -r "$REQUIREMENTS"
"$CHECKOV_VENV/bin/python" -m pip check
echo "checkov $("$CHECKOV_VENV/bin/checkov" --version) installed in $CHECKOV_VENV"
echo "$want" >"$STAMP"
