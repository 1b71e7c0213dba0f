#!/usr/bin/env bash
# Install the AWS SAM CLI into its own virtual environment (.venv-sam at the repo root).
#
# It is kept apart from the project's .venv on purpose: aws-sam-cli pins boto3, botocore,
# aws-sam-translator, cfn-lint-adjacent packages and others at versions that can conflict
# with moto and the project's own pins.
#
# Idempotent: does nothing when .venv-sam/bin/sam already reports the pinned version.
# Environment overrides:
#   SAM_VENV            target venv (default: <repo>/.venv-sam)
#   SAM_CLI_VERSION     version to install (default below)
#   PYTHON              interpreter used to create the venv (default: python3)
set -euo pipefail

SAM_CLI_VERSION="${SAM_CLI_VERSION:-1.170.0}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SAM_VENV="${SAM_VENV:-$REPO_ROOT/.venv-sam}"
PYTHON="${PYTHON:-python3}"

if [ -x "$SAM_VENV/bin/sam" ]; then
    installed="$("$SAM_VENV/bin/sam" --version 2>/dev/null | awk '{print $NF}')"
    if [ "$installed" = "$SAM_CLI_VERSION" ]; then
        echo "SAM CLI $installed already installed in $SAM_VENV"
        exit 0
    fi
    echo "SAM CLI in $SAM_VENV is '${installed:-unknown}', want $SAM_CLI_VERSION; reinstalling"
fi

echo "Installing aws-sam-cli==$SAM_CLI_VERSION into $SAM_VENV (with $("$PYTHON" --version 2>&1))"
"$PYTHON" -m venv "$SAM_VENV"
"$SAM_VENV/bin/python" -m pip install --quiet --upgrade pip
"$SAM_VENV/bin/python" -m pip install --quiet "aws-sam-cli==$SAM_CLI_VERSION"
"$SAM_VENV/bin/sam" --version
