"""GPT-2 on SlimPajama-627B. Size: --config=configs/slimpajama.py:medium (small = 124M).

Point `--config.data.path` at a local copy in SlimPajama's own layout (train/chunkN/...)
or leave it unset to stream `cerebras/SlimPajama-627B` from the HF hub (`datasets` extra).
At this scale tokenize once: `python -m jaxgpt.shards prepare --config=configs/slimpajama.py
--config.data.path=DIR --out=SHARDS`, then train with `--config.data.prepared=SHARDS`; or
stream, tokenizing while training: `--config.data.streaming=True --config.data.mixture='{}'`.
"""

import ml_collections

from jaxgpt import config as base


def get_config(size: str = "small") -> ml_collections.ConfigDict:
    # 50304 = GPT-2's 50257 BPE ids padded to a multiple of 128 for faster matmuls;
    # the padded rows are never sampled and are dropped on HF export.
    config = base.base_config(size, vocab_size=50304, n_positions=1024)
    # Accelerator settings: bfloat16 matmuls (params and optimizer state stay float32) and
    # cuDNN's flash attention on GPUs (XLA's attention elsewhere).
    config.model.dtype = "bfloat16"
    config.model.attention = "dot_product"
    config.data.source = "slimpajama"
    config.data.tokenizer = "gpt2"
    config.data.block_size = 1024
    # Sampling weights per redpajama_set_name: SlimPajama-627B's own token shares (%), so
    # the default mix is the natural one; raise one to upweight it (e.g.
    # --config.data.mixture.RedPajamaGithub=10). Sources absent from the data are ignored.
    config.data.mixture = {"RedPajamaCommonCrawl": 52.2, "RedPajamaC4": 26.7,
                           "RedPajamaGithub": 5.2, "RedPajamaBook": 4.2, "RedPajamaArXiv": 4.6,
                           "RedPajamaWikipedia": 3.8, "RedPajamaStackExchange": 3.3}
    config.data.read_threads = 4
    # 50k of the validation split's documents (~50M tokens, of its 0.5B) are prepared: enough
    # for eval.batches x eval.batch_size windows of each source but the smallest (~3%: about
    # half of that), and minutes less at start.
    config.data.val_max_documents = 50_000
    config.train.steps = 100_000
    config.train.batch_size = 512            # 0.5M tokens per step, as in GPT-3 small
    config.train.grad_accum = 16
    config.train.log_every = 10
    config.optim.learning_rate = 6e-4
    config.optim.warmup_steps = 2000
    config.eval.every = 1000
    config.eval.batch_size = 32
    config.eval.batches = 100
    config.checkpoint.every = 1000
    config.mesh.shape = (1, -1, 1)
    config.mesh.rules = "fsdp"
    config.sample.prompts = ("In the year 2100, artificial intelligence had evolved to become",
                             "The history of the Roman Empire")
    return config
