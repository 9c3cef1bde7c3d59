"""Shared test set-up: CPU-only, deterministic, DeepSpeed on its CPU accelerator."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The Triton kernels run on CPU tensors through Triton's interpreter (CI has no GPU). Set before
# anything imports triton: the interpreter is chosen when a kernel is defined.
try:
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402

# The layout of the tests is this table, not directories: every tests/test_*.py module is of exactly
# one kind, and each of its tests gets that kind's marker (`pytest -m unit`, ...). Markers instead of
# subdirectories keep every module's path (and its history) where it is. test_structure.py checks
# that the table names every test module once; docs/testing.md lists what each module proves.
KINDS = {
    # one process, no ranks, no engine or job run
    "unit": ("test_backends", "test_conformance", "test_data", "test_edges", "test_kernels_built",
             "test_lr_provenance", "test_optimizer", "test_presets", "test_properties", "test_safe_load",
             "test_step_program", "test_structure", "test_sweep", "test_sweep_fit", "test_job_contract",
             "test_engine_contract"),
    # gloo ranks on the core alone (torch DDP at most): sharded MOGA equals unsharded MOGA; the spawn runner
    "distributed": ("test_ddp", "test_fuzz_layouts", "test_sharded", "test_spawn_phases"),
    # MOGA inside an engine: DeepSpeed, Megatron-core / Megatron-LM, FSDP1/FSDP2/DTensor, Hugging Face,
    # Lightning, torchtitan
    "engines": ("test_bench_comm_fsdp", "test_bench_memory", "test_checkpoint_memory", "test_deepspeed", "test_deepspeed_plain",
                "test_deepspeed_recipes", "test_deepspeed_reshard", "test_deepspeed_zero3", "test_dtensor",
                "test_frontdoors", "test_fsdp1", "test_fsdp2_recipe", "test_megatron", "test_megatron_lm"),
    # the training job end to end: resume, faults, resharding, launchers, launch scripts, docker
    "job": ("test_docker", "test_faults", "test_launch", "test_launchers", "test_train", "test_train_reshard",
            "test_train_zero3"),
}
KIND_OF = {module: kind for kind, modules in KINDS.items() for module in modules}


@pytest.hookimpl(tryfirst=True)     # before `-m` deselects: the kind markers must be on the items
def pytest_collection_modifyitems(config, items):
    # A module missing from KINDS, or a hand-set kind marker that disagrees with it, fails
    # test_structure.py (one test, named) rather than stopping the whole run at collection.
    for item in items:
        kind = KIND_OF.get(item.path.stem)
        if kind is not None:
            item.add_marker(kind)
