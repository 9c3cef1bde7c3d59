"""Workers running the recipes of docs/deepspeed.md (docs/recipes/*.py) on gloo ranks: final
weights vs single-process MOGA on the same global batches, and the optimizer that ran is MOGA."""
import importlib.util
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from deepspeed_cases import HP, STEPS, assert_moga_ran, batches, compare, ds_config, loss_of, reference, Tiny
from moga_dist import MOGA, param_groups

RECIPES = Path(__file__).resolve().parent.parent / "docs" / "recipes"
MICRO = 2


def recipe(name):
    """docs/recipes/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def own_script(rank, world):
    import moga_dist.engines.deepspeed as mds

    mds.skip_shm_comm_build()
    data = batches(MICRO * world, STEPS)
    torch.manual_seed(0)
    engine = recipe("own_script").train(Tiny(), [t[rank * MICRO:(rank + 1) * MICRO] for t in data], loss_of,
                                        ds_config(2, MICRO, 1, clip=1.0), **HP)
    assert_moga_ran(engine.basic_optimizer, STEPS)
    compare(engine.module, reference(data, 1.0), "own script ZeRO-2", 1e-5)


def accelerate(rank, world):
    import moga_dist.engines.deepspeed as mds

    mds.skip_shm_comm_build()
    data = batches(MICRO * world, STEPS)
    # Accelerate's prepared loader gives rank r batches r, r + world, ...: step k sees data[k].
    loader = torch.utils.data.DataLoader(torch.cat(data), batch_size=MICRO, shuffle=False)
    config = {**ds_config(2, MICRO, 1, clip=1.0), "train_batch_size": MICRO * world}
    torch.manual_seed(0)
    model = recipe("accelerate_loop").train(Tiny(), loader, loss_of, config, **HP)
    assert_moga_ran(model.basic_optimizer, STEPS)
    compare(model.module, reference(data, 1.0), "accelerate ZeRO-2", 1e-5)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))


def trainer_args(tmp, world):
    return dict(output_dir=tmp, per_device_train_batch_size=MICRO, max_steps=STEPS, learning_rate=HP["lr"],
                weight_decay=HP["weight_decay"], max_grad_norm=1.0, lr_scheduler_type="constant",
                train_sampling_strategy="sequential", ddp_backend="gloo", use_cpu=True, report_to="none",
                save_strategy="no", logging_steps=10 ** 6, disable_tqdm=True, dataloader_num_workers=0)


TRAINER_DS = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
              "train_batch_size": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}


def hf_trainer(rank, world):
    import moga_dist.engines.deepspeed as mds

    mds.skip_shm_comm_build()
    optimizers_tuple_is_refused(world)
    tokens = torch.cat(batches(MICRO * world, STEPS))
    dataset = [{"input_ids": t, "labels": t} for t in tokens]
    settings = {k: v for k, v in HP.items() if k != "weight_decay"}     # the Trainer's groups set it
    trainer = recipe("hf_trainer").make_trainer(tiny_llama(), dataset, dict(TRAINER_DS), settings,
                                                **trainer_args(_shared_tmp(), world))
    trainer.train()
    assert_moga_ran(trainer.model_wrapped.basic_optimizer, STEPS)
    # The Trainer's groups are weight-decay / no-decay without roles; roles must come from the model.
    ref = tiny_llama()
    opt = MOGA(param_groups(ref), **HP)
    for k in range(STEPS):
        x = tokens[k * MICRO * world:(k + 1) * MICRO * world]
        opt.zero_grad()
        ref(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
    compare(trainer.model, ref, "HF Trainer ZeRO-2", 1e-5)


def optimizers_tuple_is_refused(world):
    """Trainer(optimizers=(MOGA(...), None)) under DeepSpeed: transformers would train AdamW.
    (Run inside the hf_trainer worker, so the default run starts the Trainer's processes once.)"""
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    dataset = [{"input_ids": t, "labels": t} for t in torch.cat(batches(MICRO * world, STEPS))]
    args = TrainingArguments(deepspeed=dict(TRAINER_DS), **trainer_args(_shared_tmp(), world))
    trainer = Trainer(model=model, args=args, train_dataset=dataset, optimizers=(MOGA(param_groups(model)), None))
    try:
        trainer.train()
    except ValueError as exc:
        assert "optimizer_cls_and_kwargs" in str(exc), str(exc)
    else:
        raise AssertionError("Trainer(optimizers=(MOGA, None)) under DeepSpeed trained silently")


def _shared_tmp():
    tmp = [tempfile.mkdtemp() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(tmp, src=0)
    return tmp[0]
