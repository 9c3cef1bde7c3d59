"""Recipe: a torchtitan config module whose optimizer is MOGA with the model's roles."""
from torchtitan.models.llama3.config_registry import llama3_debugmodel

from moga_dist.engines.torchtitan import moga_optimizer


def llama3_debugmodel_moga():
    config = llama3_debugmodel()
    config.optimizer = moga_optimizer(lr=1.6e-2, weight_decay=0.1, norm="row", hidden_mult=20.0)
    return config
