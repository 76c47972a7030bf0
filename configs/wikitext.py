"""GPT-2 on WikiText-103 (or WikiText-2). Size: --config=configs/wikitext.py:medium.

Point `--config.data.path` at local WikiText files (a folder with wiki.{train,valid}.tokens
or {train,valid}.txt, raw or tokenized; a lone file is all training text with the tail held
out), or leave it unset to stream `wikitext-103-raw-v1` through HF datasets.
`--config.init_from=hf:gpt2` fine-tunes GPT-2.
"""

import ml_collections

from jaxgpt import config as base


def get_config(size: str = "small") -> ml_collections.ConfigDict:
    config = base.base_config(size, vocab_size=50304, n_positions=1024)
    # Accelerator settings: bfloat16 matmuls (params and optimizer state stay float32) and
    # cuDNN's flash attention on GPUs (XLA's attention elsewhere).
    config.model.dtype = "bfloat16"
    config.model.attention = "dot_product"
    config.data.source = "wikitext"            # one document per article (` = Title = `)
    config.data.tokenizer = "gpt2"
    config.data.block_size = 1024
    config.train.steps = 20_000
    config.train.batch_size = 64
    config.train.grad_accum = 4
    config.train.log_every = 10
    config.optim.learning_rate = 3e-4
    config.optim.warmup_steps = 500
    config.eval.every = 500
    config.eval.batch_size = 16
    config.eval.batches = 0
    config.checkpoint.every = 500
    config.mesh.shape = (1, -1, 1)
    config.mesh.rules = "fsdp"
    config.sample.prompts = ("In the year 2100, artificial intelligence had evolved to become",
                             "The game began development in")
    return config
