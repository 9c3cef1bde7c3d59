"""The training job at engine.zero_stage = 3 (DeepSpeed ZeRO-3, MOGA's stage-3 adapter): it builds
the model under zero.Init (placeholders only, the whole build's weights bit for bit, the same MOGA
roles); on 2 gloo ranks it runs MOGA, and after 6 steps its fp32 weights equal the ZeRO-2 job's element-wise
(1e-5 of each parameter's largest entry, the resharding tests' tolerance), as do its training and
validation losses; a checkpoint of either stage is refused at the other; a run stopped at step 3 at
2 ranks resumes at 3 (an odd world: ZeRO-3 pads every parameter's partition) through MOGA's
model-space checkpoint and ends where the uninterrupted run ends; engine.zero_stage = 4 is one line
naming the allowed stages."""
import json
import shutil

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from dist_utils import spawn  # noqa: E402
from train_zero3_cases import run_stage, straight_and_split  # noqa: E402

STEPS, STOP = 6, 3
SPACE = f"checkpoints/step{STEPS:08d}/moga_model_space"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("zero3")
    spawn(2, straight_and_split, str(base), STEPS, STOP)
    return base


def _close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    for name, ref in b.items():
        err = (a[name] - ref).abs().max().item() / ref.abs().max().item()
        assert err <= rtol, (name, err)


def test_zero3_job_runs_moga_and_equals_the_zero2_job(runs):
    from moga_dist.engines.deepspeed_checkpoint import model_space_weights

    _close(model_space_weights(runs / "zero3" / SPACE), model_space_weights(runs / "zero2" / SPACE))
    common = torch.load(runs / "zero3" / SPACE / "common.pt", weights_only=True)
    assert common["zero_stage"] == 3 and common["step"] == STEPS and common["world_size"] == 2
    z3, z2 = (json.loads((runs / r / "summary.json").read_text()) for r in ("zero3", "zero2"))
    for key in ("final_train_loss", "val_loss"):
        assert z3[key] == pytest.approx(z2[key], rel=1e-5), (key, z3[key], z2[key])
    assert z3["layout"] == "ZeRO-3" and z3["optimizer"] == "moga"
    # A checkpoint of one stage is refused at the other (ZeRO-3's partitions are not ZeRO-2's), naming both.
    from moga_dist.train.checkpoint import CheckpointError, check_compatible

    for written, other in (("zero2", 3), ("zero3", 2)):
        with pytest.raises(CheckpointError, match=rf"zero_stage: checkpoint {5 - other} vs this run {other}"):
            check_compatible(runs / written / "checkpoints", f"step{STEPS:08d}", {"zero_stage": other})


@pytest.mark.slow            # a third process group (3 ranks): ~1-2 min on the shared 2-core machine
def test_zero3_job_saved_at_2_ranks_resumes_at_3(runs, tmp_path):
    from moga_dist.engines.deepspeed_checkpoint import model_space_weights

    split = tmp_path / "split"
    shutil.copytree(runs / "split", split)
    spawn(3, run_stage, str(split), 3, STEPS)
    _close(model_space_weights(split / SPACE), model_space_weights(runs / "zero3" / SPACE))
    common = torch.load(split / SPACE / "common.pt", weights_only=True)
    assert common["step"] == STEPS and common["world_size"] == 3 and common["global_steps"] == STEPS
    meta = json.loads((split / f"checkpoints/step{STOP:08d}/meta.json").read_text())
    assert meta["zero_stage"] == 3 and meta["dp_world_size"] == 2
    assert json.loads((split / "summary.json").read_text())["resumed_from"] == STOP


def test_zero_stage_4_is_one_line_naming_the_allowed_stages(monkeypatch, capsys, tmp_path):
    from moga_dist.train import __main__ as cli
    from moga_dist.train import loop
    from moga_dist.train.config import load

    assert load(None, ["engine.zero_stage=3"]).engine.zero_stage == 3
    with pytest.raises(ValueError, match=r"^engine.zero_stage=4; allowed: 0, 1, 2, 3$"):
        load(None, ["engine.zero_stage=4"])
    with pytest.raises(ValueError, match=r"engine.zero_stage=3 with parallel.engine='megatron'"):
        load(None, ["engine.zero_stage=3", "parallel.engine='megatron'"])

    def no_engine(cfg):
        raise AssertionError("the engine was built before the config was checked")

    monkeypatch.setattr(loop, "make_backend", no_engine)
    code = cli.main(["--set", "engine.zero_stage=4", "--set", f"output_dir='{tmp_path}'"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "engine.zero_stage=4; allowed: 0, 1, 2, 3" in err[0], err
