"""`python -m moga_dist.data prepare` and the job's data path: round trips through megatron-core's own
IndexedDataset (the files Megatron-LM reads) for text, JSONL and .gz with each tokenizer kind (bytes,
a BPE tokenizer.json and a Hugging Face directory, a SentencePiece .model, all trained here on the
shipped corpus); blending by weight; the global sample order at DP 1, 2, 3; every bad input refused
with one line, exit 2, nothing written or overwritten."""
import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("tokenizers")

from moga_dist.data.__main__ import main as data_main  # noqa: E402
from moga_dist.data.prepare import PrepareOptions, prepare  # noqa: E402
from moga_dist.data.shipped import kjv_jsonl, train_bpe  # noqa: E402
from moga_dist.data.tokenizer import Tokenizer  # noqa: E402
from moga_dist.train.config import load  # noqa: E402
from moga_dist.train.data import PretrainData, plan_data  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _verses(n: int) -> list[str]:
    with open(kjv_jsonl(), encoding="utf-8") as fh:
        return [json.loads(line)["text"] for _, line in zip(range(n), fh)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three inputs (JSONL, JSONL.gz, text with paragraphs), their documents in order, and the
    tokenizers trained on them."""
    base = tmp_path_factory.mktemp("data")
    verses = _verses(1500)
    docs = {"a.jsonl": verses[:400], "b.jsonl.gz": verses[400:800] + ["Caf\u00e9 \u00fcber \u2014 \u6f22\u5b57"],
            "c.txt": [" ".join(verses[i:i + 3]) for i in range(800, 1500, 3)]}
    (base / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs["a.jsonl"])))
    with gzip.open(base / "b.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write("".join(json.dumps({"text": t}) + "\n" for t in docs["b.jsonl.gz"]))
    (base / "c.txt").write_text("\n\n".join(docs["c.txt"]) + "\n")
    (base / "train.txt").write_text("\n".join(verses) + "\n")
    bpe = train_bpe(iter(verses), 512, base / "bpe" / "tokenizer.json")
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_file=str(bpe), eos_token="<|endoftext|>").save_pretrained(str(base / "hfdir"))
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(input=str(base / "train.txt"), model_prefix=str(base / "sp"), vocab_size=400,
                                   model_type="bpe", minloglevel=2)
    toks = {"bytes": "bytes", "bpe-json": str(bpe), "hf-dir": str(base / "hfdir"), "sentencepiece": str(base / "sp.model")}
    return base, docs, toks


def _read(prefix: str) -> list[list[int]]:
    """Every document of PREFIX through megatron-core's own reader."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, mmap=True)
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.mark.parametrize("kind", ["bytes", "bpe-json", "hf-dir", "sentencepiece"])
def test_round_trip_text_jsonl_gz_each_tokenizer(corpus, kind):
    base, docs, toks = corpus
    tok = Tokenizer(toks[kind])
    prefix = str(base / f"out-{kind}")
    workers = 2 if kind == "bpe-json" else 1          # the multiprocess path once
    summary = prepare(PrepareOptions(inputs=[str(base / n) for n in docs], tokenizer=toks[kind],
                                     output_prefix=prefix, append_eod=True, workers=workers, progress=False))
    want = [tok.encode(t) + [tok.eod] for n in docs for t in docs[n]]
    assert _read(prefix) == want
    assert summary["documents"] == len(want) and summary["tokens"] == sum(map(len, want))
    assert json.loads(Path(prefix + ".meta.json").read_text())["tokenizer"]["vocab_size"] == tok.vocab_size
    assert not list(base.glob(f".out-{kind}*"))       # no temporary files left


def test_eod_only_when_asked_empty_documents_and_bad_bytes_counted(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"one\n\n   \ntwo \xff\xfe end\r\nthree")
    prefix = str(tmp_path / "o")
    s = prepare(PrepareOptions(inputs=[str(tmp_path)], tokenizer="bytes", output_prefix=prefix, progress=False,
                               text_docs="line"))
    assert _read(prefix) == [list(b"one"), list("two \ufffd\ufffd end".encode()), list(b"three")]
    assert (s["documents"], s["empty_skipped"], s["undecodable"]) == (3, 2, 1)


def _digest(paths) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.exists()}


def test_cli_bad_inputs_one_line_exit_2_nothing_overwritten(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a"}\n{"text": "b"}\n')
    prefix = str(tmp_path / "ds")
    assert data_main(["prepare", "--input", str(good), "--tokenizer", "bytes", "--output-prefix", prefix, "--quiet"]) == 0
    files = [Path(prefix + s) for s in (".bin", ".idx", ".meta.json")]
    before = _digest(files)
    capsys.readouterr()
    (tmp_path / "notjson.jsonl").write_text('{"text": "a"}\n{"text": oops}\n')
    (tmp_path / "nokey.jsonl").write_text('{"text": "a"}\n\n{"body": "b"}\n')
    (tmp_path / "broken.json").write_text("{not a tokenizer")
    cases = [
        ([str(good)], "bytes", [], "ds.bin already exists: pass --overwrite"),
        ([str(tmp_path / "notjson.jsonl")], "bytes", ["--overwrite"], "notjson.jsonl:2: not a JSON object"),
        ([str(tmp_path / "nokey.jsonl")], "bytes", ["--overwrite"], "nokey.jsonl:3: not a JSON object with a string 'text' (no key 'text')"),
        ([str(good)], str(tmp_path / "broken.json"), ["--overwrite"], "broken.json'"),
        ([str(good)], str(tmp_path / "missing.model"), ["--overwrite"], "no such file or directory"),
        ([str(tmp_path / "nope")], "bytes", ["--overwrite"], "--input " + str(tmp_path / "nope")),
    ]
    for inputs, tok, extra, needle in cases:
        code = data_main(["prepare", "--input", *inputs, "--tokenizer", tok, "--output-prefix", prefix, "--quiet", *extra])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and err.count("\n") == 1, (needle, err)
        assert _digest(files) == before, needle
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    # --skip-bad-lines counts and skips them instead
    assert data_main(["prepare", "--input", str(tmp_path / "notjson.jsonl"), str(tmp_path / "nokey.jsonl"),
                      "--tokenizer", "bytes", "--output-prefix", str(tmp_path / "skip"), "--skip-bad-lines", "--quiet"]) == 0
    assert "skipped 0 empty, 2 bad lines" in capsys.readouterr().out
    # a CLI usage error from a real process: exit 2
    run = subprocess.run([sys.executable, "-m", "moga_dist.data", "prepare", "--input", str(good)], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "--tokenizer" in run.stderr


def _plan(tmp_path, *extra):
    return plan_data(load(None, [f"output_dir='{tmp_path}/run'", *extra]))


def test_job_refuses_bad_data_before_the_engine(tmp_path):
    text = tmp_path / "t.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in _verses(50)))
    prefix = str(tmp_path / "ds")
    prepare(PrepareOptions(inputs=[str(text)], tokenizer="bytes", output_prefix=prefix, append_eod=True, progress=False))
    paths = f"data.paths=['{prefix}']"
    assert _plan(tmp_path, paths).tokens[0] > 0
    bpe = train_bpe(iter(_verses(300)), 384, tmp_path / "bpe.json")
    (tmp_path / "junk.json").write_text('{"version": "1.0"}')
    cases = [
        ([f"data.paths=['{tmp_path}/none']"], f"{tmp_path}/none.idx is missing"),
        ([paths, "data.weights=[1.0, 2.0]"], "data.weights has 2 entries but data.paths has 1"),
        ([paths, "data.weights=[-1.0]"], "data.weights=[-1.0]: allowed finite numbers >= 0"),
        ([paths, "data.split='a,b'"], "data.split='a,b'"),
        ([paths, "model.vocab_size=32000"], "model.vocab_size=32000 with data.tokenizer='bytes'"),
        ([paths, f"data.tokenizer='{bpe}'", "model.vocab_size=256"], "model.vocab_size=256 but data.tokenizer"),
        ([paths, f"data.tokenizer='{bpe}'", "model.vocab_size=384"], "was prepared with tokenizer 'bytes'"),
        ([paths, f"data.tokenizer='{tmp_path}/t.jsonl'"], "unknown kind (suffix '.jsonl')"),
        ([paths, f"data.tokenizer='{tmp_path}/junk.json'"], "not a Hugging Face tokenizer.json"),
    ]
    for extra, needle in cases:
        with pytest.raises(ValueError, match=None) as err:
            _plan(tmp_path, *extra)
        assert needle in str(err.value) and "\n" not in str(err.value), (needle, str(err.value))
    with pytest.raises(ValueError, match="model.vocab_size=32000 with data.tokenizer='bytes'"):
        load(REPO / "configs/llama_7b.toml", ["data.tokenizer='bytes'"])      # the big presets need a tokenizer
    # A memory rehearsal may keep a real-size embedding on byte data, but only when it says so.
    assert _plan(tmp_path, paths, "model.vocab_size=32000", "data.oversized_vocab=true").tokens[0] > 0
    Path(prefix + ".bin").write_bytes(Path(prefix + ".bin").read_bytes()[:-10])      # a truncated copy
    with pytest.raises(ValueError, match=r"ds.bin holds .* bytes but .*ds.idx describes"):
        _plan(tmp_path, paths)
    Path(prefix + ".bin").unlink()
    with pytest.raises(ValueError, match="ds.bin is missing"):
        _plan(tmp_path, paths)


def _two_datasets(tmp_path):
    prefixes = []
    for letter in "ab":
        (tmp_path / f"{letter}.jsonl").write_text("".join(json.dumps({"text": letter * (20 + i % 7)}) + "\n"
                                                          for i in range(300)))
        prefixes.append(str(tmp_path / letter))
        prepare(PrepareOptions(inputs=[str(tmp_path / f"{letter}.jsonl")], tokenizer="bytes", output_prefix=prefixes[-1],
                               append_eod=True, progress=False))
    return prefixes


@pytest.fixture
def one_rank(tmp_path):
    """A world-1 gloo group: megatron-core's BlendedDataset asks torch.distributed for its rank."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_blend_sample_counts_follow_the_weights(tmp_path, one_rank):
    a, b = _two_datasets(tmp_path)
    cfg = load(None, [f"output_dir='{tmp_path}/run'", f"data.paths=['{a}', '{b}']", "data.weights=[3.0, 1.0]",
                      "model.max_seq_len=16", "training.steps=50", "training.global_batch_size=8",
                      "training.micro_batch_size=8", "data.split='90,10,0'"])
    data = PretrainData(plan_data(cfg), cfg, 1)
    counts = {ord("a"): 0, ord("b"): 0}
    for step in range(50):
        for row in data.train_batch(step, 0, 0, 1, 8):
            letters = set(row.tolist()) - {0}          # 0 is the byte tokenizer's EOD
            assert len(letters) == 1                   # a sample comes from one dataset
            counts[letters.pop()] += 1
    assert abs(counts[ord("a")] - 300) <= 2 and abs(counts[ord("b")] - 100) <= 2, counts
    assert data.val_batch(0, 0, 1, 8).shape == (8, 16)


def test_global_sample_order_is_the_same_at_dp_1_2_3(tmp_path):
    a, _ = _two_datasets(tmp_path)
    cfg = load(None, [f"output_dir='{tmp_path}/run'", f"data.paths=['{a}']", "model.max_seq_len=16",
                      "training.steps=4", "training.global_batch_size=12", "training.micro_batch_size=2"])
    data = PretrainData(plan_data(cfg), cfg, 1)
    seen = {}
    for dp in (1, 2, 3):
        accum = 12 // (2 * dp)
        for step in range(4):
            rows = {}
            for rank in range(dp):
                for micro in range(accum):
                    ids = PretrainData.sample_ids(step, micro, rank, dp, 2, 12)
                    for i, row in zip(ids, data.train_batch(step, micro, rank, dp, 2)):
                        assert i not in rows
                        rows[i] = row
            assert sorted(rows) == list(range(step * 12, step * 12 + 12))
            batch = torch.stack([rows[i] for i in sorted(rows)])
            if step in seen:
                assert torch.equal(seen[step], batch), (dp, step)
            seen[step] = batch
    assert not torch.equal(seen[0], seen[1])


def test_shipped_corpus_prepared_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("MOGA_DIST_CACHE", str(tmp_path / "cache"))
    plan = _plan(tmp_path)
    bin_ = Path(plan.prefixes[0] + ".bin")
    stamp = bin_.stat().st_mtime_ns
    assert plan.tokenizer.kind == "bytes" and plan.tokens[0] > 4_000_000
    assert _plan(tmp_path).prefixes == plan.prefixes and bin_.stat().st_mtime_ns == stamp
    assert np.frombuffer(bin_.read_bytes()[:64], dtype=np.uint16).max() < 256


def test_interrupted_prepare_leaves_the_final_names_untouched(tmp_path, monkeypatch, capsys):
    import moga_dist.data.prepare as prep

    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _verses(200)))
    prefix = str(tmp_path / "ds")
    assert data_main(["prepare", "--input", str(tmp_path / "in.jsonl"), "--tokenizer", "bytes", "--output-prefix",
                      prefix, "--quiet"]) == 0
    before = _digest(tmp_path.iterdir())
    real, calls = prep._encode_chunk, []

    def interrupted(texts):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(texts)

    monkeypatch.setattr(prep, "CHUNK_BYTES", 2000)          # many chunks: stop in the middle
    monkeypatch.setattr(prep, "_encode_chunk", interrupted)
    assert data_main(["prepare", "--input", str(tmp_path / "in.jsonl"), "--tokenizer", "bytes", "--output-prefix",
                      prefix, "--overwrite", "--append-eod", "--quiet"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert _digest(tmp_path.iterdir()) == before           # the old files, no temporary ones
