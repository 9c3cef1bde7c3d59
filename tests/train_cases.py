"""Workers for the training-job tests (2 gloo ranks, a tiny LLaMA, a few steps)."""
from pathlib import Path

from moga_dist.train.config import load

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.intermediate_size=64", "model.max_seq_len=32", "training.micro_batch_size=2",
        "training.global_batch_size=4", "training.warmup_steps=2", "training.log_every=1",
        "training.eval_every=3", "training.eval_batches=2", "checkpoint.every=3", "checkpoint.keep=5"]


def tiny(out: str, steps: int, *extra: str):
    return load(None, TINY + [f"output_dir='{out}'", f"training.steps={steps}", *extra])


def resume_equivalence(rank, world, base):
    from moga_dist.train.loop import run

    run(tiny(f"{base}/straight", 6))
    # An interrupted run, its checkpoint written as the old default did (DeepSpeed's files and the
    # model-space state): the default resume reads the model-space state.
    run(tiny(f"{base}/split", 6, "training.stop_at_step=3", "checkpoint.deepspeed_files=true"))
    if rank == 0:   # debris of a crash mid-write must not confuse the resume
        Path(f"{base}/split/checkpoints/.tmp-step00000006").mkdir()
    run(tiny(f"{base}/split", 6))


def checkpoint_bytes(rank, world, base):
    """The default job with MOGA and the same job with AdamW, 3 steps each (one checkpoint each)."""
    from moga_dist.train.loop import run

    run(tiny(f"{base}/moga", 3))
    run(tiny(f"{base}/adamw", 3, "optimizer.name='adamw'"))


def refusals(rank, world, base):
    from moga_dist.train.loop import run

    run(tiny(f"{base}/a", 6, "training.stop_at_step=3"))
    before = sorted(str(p) for p in Path(f"{base}/a/checkpoints").rglob("*"))
    for extra, needle in ((["model.hidden_size=64"], "hidden_size"), (["checkpoint.resume=false"], "refusing to overwrite")):
        try:
            run(tiny(f"{base}/a", 6, *extra))
        except ValueError as exc:
            assert needle in str(exc), str(exc)
        else:
            raise AssertionError(f"{extra} was not refused")
    assert sorted(str(p) for p in Path(f"{base}/a/checkpoints").rglob("*")) == before


def bpe_preset(rank, world, out):
    """configs/tiny_bpe_cpu.toml end to end, shrunk to a few steps: the BPE is trained on the
    shipped corpus, the corpus prepared with it, and the job trains from the indexed files."""
    import json
    import math

    from moga_dist.train.loop import run

    preset = Path(__file__).resolve().parent.parent / "configs" / "tiny_bpe_cpu.toml"
    keep = [o for o in TINY if not o.startswith("model.vocab_size")]
    cfg = load(preset, keep + [f"output_dir='{out}'", "training.steps=3", "training.global_batch_size=2"])
    assert cfg.data.tokenizer == "kjv-bpe" and cfg.model.vocab_size == 1024
    summary = run(cfg)
    assert summary["optimizer"] == "moga" and math.isfinite(summary["final_train_loss"]), summary
    assert math.isfinite(summary["val_loss"]), summary
    if rank == 0:
        (Path(out) / "result.json").write_text(json.dumps(summary))
