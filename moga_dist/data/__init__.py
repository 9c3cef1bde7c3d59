"""Pretraining data: `python -m moga_dist.data prepare` writes megatron-core's indexed format
(prepare.py), tokenizers from local files (tokenizer.py), checks of prepared files (indexed.py),
and the shipped corpus (shipped.py). The training job reads the files through megatron-core's
GPTDataset (moga_dist/train/data.py). See docs/data.md."""
