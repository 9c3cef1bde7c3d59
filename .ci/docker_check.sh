#!/usr/bin/env bash
# CI step after the README's test command: build the CPU image here without any image registry and run
# the main job as two containers acting as two nodes (tests/test_docker.py; about 15 min on 2 cores).
# Starts a private Docker daemon (installing docker.io and debootstrap when absent) and stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -m docker -s -rs tests/test_docker.py
