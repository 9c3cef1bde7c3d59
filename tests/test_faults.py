"""Fault injection on the main job (2 CPU ranks, tiny LLaMA, ZeRO-2): damaged, deleted or
poisoned checkpoints, a bad `latest`, divergence, a rank killed mid-save, a full disk, bad input.

One uninterrupted run (steps 3 and 6 checkpointed) is shared: the module fixture damages a copy of
its checkpoints per scenario and resumes each (fault_cases.scenarios); every test below judges one
scenario, so each failure is its own."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from dist_utils import free_port, spawn  # noqa: E402
from fault_cases import (  # noqa: E402
    COMMON,
    MARKER,
    RANK0,
    RANK1,
    STRAIGHT,
    killed_mid_save,
    resume,
    scenarios,
)
from train_cases import TINY  # noqa: E402

S3, S6 = "step00000003", "step00000006"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    spawn(2, scenarios, str(base), init_process_group=False)
    return base, json.loads((base / "results.json").read_text())


def _weights(ckpt: Path):
    """The fp32 master weights, from MOGA's model-space state (the default checkpoint's only copy)."""
    from moga_dist.engines.deepspeed_checkpoint import model_space_weights

    return model_space_weights(ckpt / "moga_model_space")


def _digest(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _assert_equal_weights(a: Path, b: Path):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# scenario -> the file a refusal must name
FALLBACK = {"flip_model": RANK0, "flip_optim": RANK1, "deleted_model_file": COMMON, "malformed_meta": "meta.json",
            "pickle_payload": COMMON}


@pytest.mark.parametrize("name", sorted(FALLBACK))
def test_damaged_latest_checkpoint_is_refused_naming_the_file_and_the_job_falls_back(faults, name):
    base, results = faults
    r = results[name]
    assert r["error"] is None, r["error"]
    assert r["resumed_from"] == 3
    refusal = [n for n in r["notes"] if "refused" in n]
    assert refusal and FALLBACK[name] in refusal[0] and S6 in refusal[0], r["notes"]
    ckpt = base / name / "checkpoints"
    assert _digest(ckpt / S3) == _digest(base / STRAIGHT / "checkpoints" / S3)     # the older one untouched
    assert (ckpt / f"superseded-{S6}-1").is_dir()                                 # the damaged one kept aside
    _assert_equal_weights(ckpt / S6, base / STRAIGHT / "checkpoints" / S6)       # exact resume from step 3


def test_deleted_latest_checkpoint_resumes_from_the_older_one_unchanged(faults):
    base, results = faults
    r = results["deleted_latest"]
    assert r["error"] is None and r["resumed_from"] == 3, r
    ckpt = base / "deleted_latest" / "checkpoints"
    assert _digest(ckpt / S3) == _digest(base / STRAIGHT / "checkpoints" / S3)
    _assert_equal_weights(ckpt / S6, base / STRAIGHT / "checkpoints" / S6)


@pytest.mark.parametrize("name", ["bad_latest", "missing_latest"])
def test_missing_or_invalid_latest_falls_back_to_the_newest_intact_checkpoint(faults, name):
    base, results = faults
    r = results[name]
    assert r["error"] is None and r["resumed_from"] == 6, r
    assert any("latest" in n for n in r["notes"]), r["notes"]
    assert _digest(base / name / "checkpoints" / S6) == _digest(base / STRAIGHT / "checkpoints" / S6)


def test_pickle_payload_in_a_checkpoint_never_runs(faults):
    base, results = faults
    assert not (base / MARKER).exists()
    assert not any(results["pickle_payload"]["marker_seen_by_rank"])


def test_no_intact_checkpoint_is_an_error_naming_every_damaged_file_not_a_fresh_start(faults):
    base, results = faults
    err = results["all_damaged"]["error"]
    assert err and "no intact checkpoint" in err and S3 in err and S6 in err, err
    assert sorted(p.name for p in (base / "all_damaged" / "checkpoints").iterdir() if p.is_dir()) == [S3, S6]


@pytest.mark.parametrize("name,expected", [("lr_inf", "ValueError: optimizer.moga.lr=inf: allowed a finite"),
                                           ("lr_1e6", "TrainingDiverged: step ")], ids=["lr_inf", "lr_1e6"])
def test_divergence_stops_the_job_and_keeps_the_last_finite_checkpoints(faults, name, expected):
    base, results = faults
    err = results[name]["error"]
    assert err and err.startswith(expected), err
    ckpt = base / name / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == [S3, S6]
    assert (ckpt / "latest").read_text() == S6
    for tag in (S3, S6):
        assert _digest(ckpt / tag) == _digest(base / STRAIGHT / "checkpoints" / tag)


@pytest.mark.slow
def test_rank_killed_mid_save_resumes_equal_to_an_uninterrupted_run(faults, tmp_path):
    base, _ = faults
    out = tmp_path / "killed"
    with pytest.raises(Exception):            # noqa: B017 - the spawn reports the SIGKILLed rank
        spawn(2, killed_mid_save, str(out), init_process_group=False)
    assert (out / "checkpoints" / "latest").read_text() == S3
    spawn(2, resume, str(out), init_process_group=False)
    assert not list((out / "checkpoints").glob(".tmp-*"))
    _assert_equal_weights(out / "checkpoints" / S6, base / STRAIGHT / "checkpoints" / S6)


def _cli(args, cwd, prefix=()):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_PORT": str(free_port())}
    return subprocess.run([*prefix, sys.executable, "-m", "moga_dist.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env)


def _one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("moga_dist.train: error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,needle", [
    (["--config", "no/such.toml"], "no/such.toml"),
    (["--set", "training.steps=abc"], "training.steps='abc'"),
    (["--set", 'optimizer.moga.momentum="0.95"'], "optimizer.moga.momentum='0.95'"),
    (["--set", "data.paths=['no/such/prefix']"], "no/such/prefix.idx is missing"),
    (["--set", "data.tokenizer='no/such/tokenizer.model'"], "tokenizer 'no/such/tokenizer.model': no such file"),
    (["--set", "data.weights=[1.0, 1.0]"], "data.weights has 2 entries but data.paths has 1"),
], ids=["missing-config", "steps-abc", "momentum-string", "missing-dataset", "missing-tokenizer", "weights-length"])
def test_bad_input_is_one_line_exit_2_before_the_engine_starts(args, needle, tmp_path, monkeypatch, capsys):
    from moga_dist.train import __main__ as cli
    from moga_dist.train import loop

    def no_engine(cfg):
        raise AssertionError("the engine was built before the input was checked")

    monkeypatch.setattr(loop, "make_backend", no_engine)
    code = cli.main([*args, "--set", f"output_dir='{tmp_path}'"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


def _tmpfs_available() -> bool:
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"],
                           capture_output=True) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


@pytest.mark.skipif(not _tmpfs_available(), reason="needs unshare -rm and a tmpfs mount (a user namespace)")
def test_full_disk_says_no_space_left_keeps_the_previous_checkpoint_and_no_partial_dir(tmp_path):
    disk, report = tmp_path / "disk", tmp_path / "report.json"
    disk.mkdir()
    # 480 kB hold the step-2 checkpoint (MOGA's model-space state alone, ~310 kB, in 4 kB pages) and
    # the logs; the step-4 one does not fit. The
    # mount lives in the namespace only, so the folder is inspected there, after the job exits.
    args = [a for s in TINY for a in ("--set", s)] + ["--set", f"output_dir='{disk}/run'", "--set",
                                                       "training.steps=4", "--set", "checkpoint.every=2",
                                                       "--set", f"data.cache_dir='{tmp_path}/data_cache'"]  # not on the small disk
    inspect = (f"import json, pathlib; from moga_dist.train import checkpoint as c; d = pathlib.Path('{disk}/run/checkpoints'); "
               f"json.dump({{'names': sorted(p.name for p in d.iterdir()), 'latest': (d / 'latest').read_text(), "
               f"'problems': c.verify(d / 'step00000002', c.Group(0, 1))}}, open('{report}', 'w'))")
    script = (f'mount -t tmpfs -o size=480k none {disk} && {{ "$@"; rc=$?; '
              f'{sys.executable} -c "{inspect}"; exit $rc; }}')
    proc = _cli(args, REPO, prefix=("unshare", "-rm", "sh", "-c", script, "sh"))
    _one_line_error(proc, "no space left")
    assert "step00000002" in proc.stderr
    seen = json.loads(report.read_text())
    assert not [n for n in seen["names"] if n.startswith(".tmp-")], seen
    assert seen["latest"] == "step00000002" and seen["problems"] == [], seen


def test_bench_help_lists_the_commands_and_exits_0(capsys):
    from moga_dist.bench.__main__ import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main(["bogus"]) == 2
