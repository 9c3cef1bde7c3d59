"""Recipe: the Hugging Face Trainer with a DeepSpeed config. Pass MOGA as optimizer_cls_and_kwargs
(not optimizers=(MOGA(...), None), which transformers discards under DeepSpeed; that is refused)."""
from transformers import Trainer, TrainingArguments

from moga_dist import MOGA


def make_trainer(model, dataset, ds_config, moga_settings, **training_args):
    args = TrainingArguments(deepspeed=ds_config, **training_args)      # weight decay: args.weight_decay
    return Trainer(model=model, args=args, train_dataset=dataset, optimizer_cls_and_kwargs=(MOGA, moga_settings))
