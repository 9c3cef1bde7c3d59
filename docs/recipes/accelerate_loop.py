"""Recipe: Accelerate with a DeepSpeed plugin; MOGA goes through accelerator.prepare."""
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

from moga_dist import MOGA, param_groups


def train(model, loader, loss_fn, ds_config, **moga_settings):
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config),
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])   # CPU; drop on GPUs
    model, optimizer, loader = accelerator.prepare(model, MOGA(param_groups(model), **moga_settings), loader)
    for batch in loader:
        accelerator.backward(loss_fn(model, batch))
        optimizer.step()
        optimizer.zero_grad()
    return model
