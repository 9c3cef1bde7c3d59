"""The three recipes of docs/deepspeed.md (own script, Hugging Face Trainer, Accelerate) under
DeepSpeed ZeRO-2 on 2 gloo ranks equal single-process MOGA on the same batches (1e-5 relative),
and the optimizer that ran is MOGA; the Trainer's discarded optimizers tuple is refused (hf_trainer)."""
import re
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

import deepspeed_recipes_cases as cases  # noqa: E402
from dist_utils import spawn  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("worker", ["own_script", "hf_trainer", "accelerate"])
def test_recipe_equals_single_process_moga(worker):
    if worker.startswith("hf_"):
        pytest.importorskip("transformers")
    if worker == "accelerate":
        pytest.importorskip("accelerate")
    spawn(2, getattr(cases, worker))


@pytest.mark.parametrize("name", ["own_script", "hf_trainer", "accelerate_loop"])
def test_docs_show_the_tested_recipe(name):
    """docs/deepspeed.md quotes each recipe's code (from its first import) verbatim."""
    code = (DOCS / "recipes" / f"{name}.py").read_text()
    code = code[re.search(r"^(import|from) ", code, re.M).start():].strip()
    assert code in (DOCS / "deepspeed.md").read_text(), name
