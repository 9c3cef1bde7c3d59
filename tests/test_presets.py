"""Every preset in configs/ parses, divides by its parallel layout, and fits the GPU it names."""
from pathlib import Path

import pytest

from moga_dist.train.config import load
from moga_dist.train.engine_config import deepspeed_config, megatron_args
from moga_dist.train.presets import check, memory_estimate, parameter_count

PRESETS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.toml"))


def test_the_expected_presets_exist():
    names = {p.stem for p in PRESETS}
    assert {"tiny_cpu", "llama_125m", "llama_1b", "llama_7b", "llama_13b", "llama_70b"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_is_valid_and_fits(path, capsys):
    cfg = load(path)
    estimate = check(cfg)
    gib = 2 ** 30
    print(f"{cfg.name}: {estimate['params'] / 1e9:.2f}B params, {estimate['total'] / gib:.1f} GiB per GPU "
          f"of {estimate['budget'] / gib:.0f} usable on {cfg.parallel.gpu}")
    assert estimate["fits"], estimate
    m, tp = cfg.model, cfg.parallel.tensor_parallel
    assert m.hidden_size % m.num_heads == 0 and m.num_heads % tp == 0
    if cfg.parallel.engine == "megatron":
        flags = megatron_args(cfg)
        assert flags[flags.index("--tensor-model-parallel-size") + 1] == str(tp)
    else:
        ds = deepspeed_config(cfg, cfg.parallel.nodes * cfg.parallel.gpus_per_node)
        assert "optimizer" not in ds          # MOGA is passed as an object: one source of its settings
        assert ds["zero_optimization"]["stage"] == cfg.engine.zero_stage


def test_parameter_count_matches_llama_7b_and_70b():
    assert abs(parameter_count(load(Path("configs/llama_7b.toml"))) - 6.74e9) < 0.01e9
    assert abs(parameter_count(load(Path("configs/llama_70b.toml"))) - 68.98e9) < 0.05e9


def test_a_layout_that_cannot_fit_is_reported():
    cfg = load(Path("configs/llama_7b.toml"), ["parallel.gpu='A100-40GB'", "training.micro_batch_size=8",
                                               "parallel.activation_checkpointing=false",
                                               "training.global_batch_size=256"])
    assert not memory_estimate(cfg)["fits"]


def test_tensor_parallel_that_does_not_divide_heads_is_refused():
    with pytest.raises(ValueError, match="model.num_heads=40 is not divisible by parallel.tensor_parallel=16"):
        load(Path("configs/llama_13b.toml"), ["parallel.tensor_parallel=16"])
