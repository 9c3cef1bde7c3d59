"""The engine contract, single process: `MOGA.from_engine` over engine-owned tensors described by
core ParamSpecs equals the float64 reference element-wise; a slot keeps its ParamSpec when an
engine swaps another tensor into it (Megatron's Float16 wrapper) or fills an empty group only to
step (ZeRO-3); one role rule (param_groups) for module-named embeddings and tied pipeline copies;
one model-space format name, old names read by their own container only."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from moga_dist import MOGA, ShardLayout
from moga_dist.core.flat import partition_ranges
from moga_dist.core.param_groups import assign_roles
from moga_dist.core.param_spec import ParamSpec
from moga_dist.core.reference import reference_step
from moga_dist.core.tensors import FlatBuffer

HP = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.1}


def _close(got, want):
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-7), (got - want).abs().max()


def _weights():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(6, 4, generator=gen), torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen)]


def test_from_engine_over_views_equals_the_reference_per_role():
    """Non-leaf views of one buffer (as Megatron's shards are), roles from the ParamSpecs: no
    placeholder parameter, each tensor updated by its spec's role."""
    ws = _weights()
    buffer = torch.cat([w.reshape(-1) for w in ws]).requires_grad_()
    with torch.no_grad():
        views = [v.view(w.shape) for v, w in zip(buffer.split([w.numel() for w in ws]), ws)]
    roles = ["hidden", "embedding", "vector"]
    specs = [ParamSpec(f"p{i}", r, ShardLayout(tuple(w.shape)), order_key=i) for i, (w, r) in enumerate(zip(ws, roles))]
    moga = MOGA.from_engine([{"params": views}], [specs], **HP)
    assert [p for g in moga.param_groups for p in g["params"]] == views
    grads = [torch.randn_like(w) for w in ws]
    for v, g in zip(views, grads):
        v.grad = g.clone()
    moga.step()
    for v, w, g, r in zip(views, ws, grads, roles):
        want, _ = reference_step(w, g, torch.zeros_like(w), r, **HP)
        _close(v, want)


def test_a_tensor_swapped_into_a_slot_takes_the_slots_spec():
    """Megatron's Float16 wrapper puts an fp32 main copy into each bf16 parameter's slot after MOGA
    is built; the copy is declared with the slot's ParamSpec (here: embedding, a sign update)."""
    w = torch.randn(5, 3)
    low = nn.Parameter(w.to(torch.bfloat16))
    moga = MOGA.from_engine([{"params": [low]}], [[ParamSpec("emb", "embedding", ShardLayout((5, 3)))]], **HP)
    main = w.clone().requires_grad_()
    moga.param_groups[0]["params"][0] = main
    g = torch.randn(5, 3)
    main.grad = g.clone()
    moga.step()
    want, _ = reference_step(w, g, torch.zeros_like(w), "embedding", **HP)
    _close(main, want)
    assert moga.tensors.options[id(main)]["role"] == "embedding"


def test_an_empty_group_filled_only_to_step_takes_its_flat_slot():
    """ZeRO-3 keeps MOGA's groups empty and puts its sub-group flats in only to step: described
    slots need no membership trick; the flat's segments are updated as their parameters."""
    ws = _weights()[:2]
    flat = torch.cat([w.reshape(-1) for w in ws]).requires_grad_()
    segments, start = [], 0
    for i, w in enumerate(ws):
        segments.append(ParamSpec(f"p{i}", "hidden", ShardLayout(tuple(w.shape)), options={"lr": HP["lr"]}).segment(start))
        start += w.numel()
    moga = MOGA.from_engine([{"params": []}], [[FlatBuffer(segments, HP["lr"])]], **HP)
    grads = [torch.randn_like(w) for w in ws]
    flat.grad = torch.cat([g.reshape(-1) for g in grads])
    moga.param_groups[0]["params"] = [flat]
    moga.step()
    moga.param_groups[0]["params"] = []
    for seg, w, g in zip(segments, ws, grads):
        want, _ = reference_step(w, g, torch.zeros_like(w), "hidden", **HP)
        _close(flat.detach()[seg.start:seg.start + seg.numel].view(w.shape), want)


def test_undescribed_tensors_and_bad_specs_are_refused():
    p = nn.Parameter(torch.randn(3, 2))
    moga = MOGA.from_engine([{"params": [p]}], [[ParamSpec("w", "hidden", ShardLayout((3, 2)))]], **HP)
    moga.param_groups[0]["params"].append(nn.Parameter(torch.randn(6)))
    p.grad = torch.randn(3, 2)
    with pytest.raises(ValueError, match="holds 2 tensors, but its engine described 1"):
        moga.step()
    with pytest.raises(ValueError, match=r"role='middle'; allowed: \['hidden'"):
        ParamSpec("w", "middle", ShardLayout((3, 2)))
    with pytest.raises(ValueError, match="described 2 param groups, MOGA has 1"):
        MOGA.from_engine([{"params": [p]}], [[], []])
    with pytest.raises(ValueError, match="does not match its layout"):
        MOGA.from_engine([{"params": [p]}], [[ParamSpec("w", "hidden", ShardLayout((4, 2)))]])


def test_ghost_specs_and_process_group_accessor():
    moga = MOGA.from_engine([{"params": []}], [[]], process_groups={"tp": None})
    assert moga.process_group("tp") is None and moga.process_group("dp") is None
    sentinel = object()
    moga.set_process_group("dp", sentinel)
    assert moga.process_group("dp") is sentinel


def test_one_role_rule_names_and_tied_pipeline_copies():
    """Megatron's VocabParallelEmbedding is not an nn.Embedding: its module name marks it; the last
    pipeline stage's copy of a tied embedding (shared_embedding=True) is an embedding, not a head."""
    class VocabParallelEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(10, 4))

    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = VocabParallelEmbedding()
            self.position_embeddings = nn.Embedding(8, 4)
            self.fc = nn.Linear(4, 4)
            self.output_layer = nn.Linear(4, 10, bias=False)

    first = Stage()
    assert assign_roles(first) == {"word_embeddings.weight": "embedding", "position_embeddings.weight": "embedding",
                                   "fc.weight": "hidden", "fc.bias": "vector", "output_layer.weight": "head"}
    last = Stage()
    last.output_layer.weight.shared_embedding = True
    assert assign_roles(last)["output_layer.weight"] == "embedding"


def test_partition_ranges_cut_buckets_at_their_offset():
    # a 10-element parameter at 3 of a bucket that starts at 4 and is cut into 2 x 8
    assert partition_ranges(3, 10, 8, 2, base=4) == ((1, 9), (9, 10))
    assert partition_ranges(0, 5, 4, 3) == ((0, 4), (4, 5), (5, 5))


def test_one_model_space_format_reads_each_containers_old_name_only():
    from moga_dist.engines.model_space import DEEPSPEED, FORMAT, MEGATRON, check_format

    for container in (DEEPSPEED, MEGATRON):
        check_format(FORMAT, container, "x")
    check_format("moga-model-space-1", DEEPSPEED, "x")
    check_format("moga_model_space", MEGATRON, "x")
    with pytest.raises(ValueError, match="'moga_model_space' \\(written by moga_dist's megatron path\\)"):
        check_format("moga_model_space", DEEPSPEED, "x")
    with pytest.raises(ValueError, match="'moga-model-space-1' \\(written by moga_dist's deepspeed path\\)"):
        check_format("moga-model-space-1", MEGATRON, "x")
    with pytest.raises(ValueError, match="format 'dp_reshardable'.*reads 'moga-model-space-2', 'moga_model_space'"):
        check_format("dp_reshardable", MEGATRON, "x")


@pytest.mark.parametrize("name", ["moga-model-space-1", "moga-model-space-2", "moga_model_space"])
def test_deepspeed_model_space_files_of_each_name(tmp_path, name):
    """DeepSpeed model-space files written under the old name load as they are; Megatron's old
    name is refused by name, never misread."""
    from moga_dist.engines.deepspeed_checkpoint import (
        COMMON,
        model_space_weights,
        rank_file,
    )

    w = torch.arange(6.0).view(2, 3)
    torch.save({"format": name, "world_size": 2, "zero_stage": 1, "step": 1}, tmp_path / COMMON)
    for rank, (lo, hi) in enumerate(((0, 4), (4, 6))):
        piece = {"shape": [2, 3], "start": lo, "end": hi, "weight": w.reshape(-1)[lo:hi].clone(),
                 "momentum_buffer": torch.zeros(hi - lo)}
        torch.save({"format": name, "rank": rank, "pieces": {"w": piece}}, tmp_path / rank_file(rank))
    if name == "moga_model_space":
        with pytest.raises(ValueError, match="'moga_model_space' \\(written by moga_dist's megatron path\\)"):
            model_space_weights(tmp_path)
    else:
        assert torch.equal(model_space_weights(tmp_path)["w"], w)
