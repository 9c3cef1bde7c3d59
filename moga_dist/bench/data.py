"""`python -m moga_dist.bench data`: the data path's cost.

Generates two corpora in a temporary directory outside the repository (deleted afterwards) from the
shipped text: JSONL documents of ~20 consecutive verses (~2.7 KB, a web-page-sized document), the
documents shuffled and repeated up to ~10 MB and ~500 MB. Then prints:
  - prepare throughput (MB/s of input text) with the byte tokenizer and with the BPE trained on the
    shipped corpus ('kjv-bpe'), per worker count;
  - per-rank peak RSS of the job (2 ranks, tiny_cpu, DeepSpeed ZeRO-2) once its data are built and
    its first batch read, before the first step, for each corpus size;
  - the loader's tokens/s per rank (GPTDataset reads, nothing else) against the job's own tokens/s
    per rank (5 timed optimizer steps of tiny_cpu).
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

VERSES_PER_DOC = 20


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """A JSONL corpus of ~`megabytes` MB: shuffled repeats of the shipped text; returns its bytes."""
    from ..data.shipped import _kjv_texts

    verses = list(_kjv_texts())
    docs = [" ".join(verses[i:i + VERSES_PER_DOC]) for i in range(0, len(verses), VERSES_PER_DOC)]
    lines = [json.dumps({"text": d}) + "\n" for d in docs]
    rng, target, written = random.Random(seed), int(megabytes * 2 ** 20), 0
    with open(path, "w") as fh:
        while written < target:
            rng.shuffle(lines)
            for line in lines:
                fh.write(line)
                written += len(line)
                if written >= target:
                    break
    return path.stat().st_size


def _rank(rank: int, world: int, prefix: str, out: str) -> None:
    """One rank of the job up to its first batch (RSS), then loader and job throughput."""
    from ..train.config import load
    from ..train.data import PretrainData, plan_data
    from ..train.loop import make_backend

    preset = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.toml"
    cfg = load(preset if preset.is_file() else None,
               [f"data.paths=['{prefix}']", f"output_dir='{out}/run'", "training.steps=1500"])
    plan = plan_data(cfg)
    backend = make_backend(cfg)
    data = PretrainData(plan, cfg, backend.dp_world)
    mbs, seq = cfg.training.micro_batch_size, cfg.model.max_seq_len
    data.train_batch(0, 0, backend.dp_rank, backend.dp_world, mbs)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n, t0 = 300, time.perf_counter()
    for step in range(n):
        data.train_batch(step, 0, backend.dp_rank, backend.dp_world, mbs)
    loader = n * mbs * seq / (time.perf_counter() - t0)
    from ..train.config import accumulation_steps

    accum = accumulation_steps(cfg, backend.dp_world)
    backend.train_step(0, accum, data)
    t0 = time.perf_counter()
    for step in range(1, 6):
        backend.train_step(step, accum, data)
    job = 5 * cfg.training.global_batch_size * seq / backend.world / (time.perf_counter() - t0)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"rss_mb": rss_mb, "loader": loader, "job": job}))


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (prepare's pool workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _prepare(inputs: list[str], tokenizer: str, prefix: str, workers: int) -> tuple[float, float]:
    """(MB/s of input text on the wall clock, MB per CPU-second of all processes): the second does
    not depend on how busy the machine's cores are."""
    from ..data.prepare import PrepareOptions, prepare

    cpu = _cpu_seconds()
    s = prepare(PrepareOptions(inputs=inputs, tokenizer=tokenizer, output_prefix=prefix, workers=workers,
                               append_eod=True, overwrite=True, progress=False))
    mb = s["input_bytes"] / 2 ** 20
    return mb / s["seconds"], mb / (_cpu_seconds() - cpu)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m moga_dist.bench data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small-mb", type=float, default=10.0)
    ap.add_argument("--large-mb", type=float, default=500.0)
    ap.add_argument("--workers", type=int, default=2, help="prepare workers for the large corpus (default 2)")
    args = ap.parse_args(argv)
    from ..data.shipped import resolve_tokenizer
    from ..testing import spawn

    tmp = Path(tempfile.mkdtemp(prefix="moga_bench_data_"))
    try:
        sizes = {"small": args.small_mb, "large": args.large_mb}
        for name, mb in sizes.items():
            make_corpus(tmp / f"{name}.jsonl", mb)
        bpe = resolve_tokenizer("kjv-bpe")
        for workers in (1, 2):
            rate, per_cpu = _prepare([str(tmp / "small.jsonl")], bpe, str(tmp / "small_bpe"), workers)
            print(f"data: prepare corpus={args.small_mb:g}MB tokenizer=kjv-bpe workers={workers} "
                  f"MB_per_s={rate:.1f} per_worker={rate / workers:.1f} MB_per_cpu_s={per_cpu:.1f}", flush=True)
        rss, speeds = {}, {}
        for name, mb in sizes.items():
            prefix = str(tmp / f"{name}_bytes")
            rate, per_cpu = _prepare([str(tmp / f"{name}.jsonl")], "bytes", prefix, args.workers)
            print(f"data: prepare corpus={mb:g}MB tokenizer=bytes workers={args.workers} MB_per_s={rate:.1f} "
                  f"per_worker={rate / args.workers:.1f} MB_per_cpu_s={per_cpu:.1f}", flush=True)
            (tmp / f"{name}.jsonl").unlink()
            out = tmp / f"job_{name}"
            out.mkdir()
            # cold: rank 0 builds GPTDataset's indices first; warm: a second run reuses the cache.
            for when in ("cold", "warm"):
                spawn(2, _rank, prefix, str(out), init_process_group=False)
                ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
                rss[name, when] = [r["rss_mb"] for r in ranks]
                speeds[name, when] = ranks
                print(f"data: job corpus={mb:g}MB {when} peak_rss_before_first_step_MB="
                      + ",".join(f"{v:.0f}" for v in rss[name, when])
                      + " loader_tokens_per_s_per_rank=" + ",".join(f"{r['loader']:.0f}" for r in ranks)
                      + " job_tokens_per_s_per_rank=" + ",".join(f"{r['job']:.0f}" for r in ranks), flush=True)
        growth = {when: max(b - a for a, b in zip(rss["small", when], rss["large", when])) for when in ("cold", "warm")}
        ratio = min(r["loader"] / r["job"] for rs in speeds.values() for r in rs)
        print(f"data: rss_growth_small_to_large_MB cold={growth['cold']:.0f} warm={growth['warm']:.0f} (goal <= 64) "
              f"loader/job={ratio:.0f}x (goal >= 20)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
