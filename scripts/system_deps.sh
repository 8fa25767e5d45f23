#!/usr/bin/env bash
# System packages the test suite needs beyond the Python venv, installed only when missing (idempotent).
# Chromium renders the evaluation report headless in tests/test_evaluate_report.py (the screenshot test).
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
fi
