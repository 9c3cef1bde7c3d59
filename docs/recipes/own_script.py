"""Recipe: your own DeepSpeed script. Building MOGA is all it takes for it to be exact inside DeepSpeed."""
import deepspeed

from moga_dist import MOGA, param_groups


def train(model, batches, loss_fn, ds_config, **moga_settings):
    optimizer = MOGA(param_groups(model), **moga_settings)     # roles: embedding / head / hidden / vector
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    for batch in batches:
        engine.backward(loss_fn(engine, batch))
        engine.step()
    return engine
