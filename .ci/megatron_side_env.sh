#!/usr/bin/env bash
# megatron-core >= 0.18 (its emerging-optimizer registry; Megatron-LM's megatron.training in the wheel)
# declares Requires-Python >= 3.12, while the README's environment is Python 3.11 with 0.16.1. This
# side environment overlays megatron-core 0.19.2 (installed with --ignore-requires-python, no deps)
# on the main .venv's packages and runs the tests that need it: the registry path and Megatron-LM's
# own parser, validation and optimizer factory with --optimizer moga. Run after .ci/run has built .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
side=.cache/venv-megatron-core-0.19.2
if [ ! -x "$side/bin/python" ]; then
  python3 -m venv "$side"
  main_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  side_site=$("$side/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$main_site" > "$side_site/zz_main_venv.pth"      # torch, numpy, triton, pytest from .venv
  "$side/bin/pip" install -q --no-deps --ignore-requires-python megatron-core==0.19.2
fi
PYTHONPATH="$PWD" "$side/bin/python" -m pytest -q -p no:cacheprovider tests/test_megatron_lm.py \
  tests/test_megatron.py::test_megatron_registry_of_0_18_takes_optimizer_moga \
  tests/test_megatron.py::test_megatron_registry_of_0_18_bf16_step_equals_float64_reference
