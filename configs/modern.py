"""The newer-component GPT on SlimPajama. Size: --config=configs/modern.py:small (modern-124M).

Rotary positions, RMSNorm, SwiGLU, no biases, grouped-query attention and QK-norm at GPT-2's
parameter budget (see `model.modern_config`); data, optimizer and schedule are those of
configs/slimpajama.py (keep them in step), so the two runs compare the architecture alone.
Each option can be switched back, e.g. `--config.model.qk_norm=False`. HF export refuses
these models (GPT-2 has no names for their weights).
"""

import dataclasses

import ml_collections

from jaxgpt import config as base
from jaxgpt import model


def get_config(size: str = "small") -> ml_collections.ConfigDict:
    config = base.base_config(size)
    # 50304 = GPT-2's 50257 BPE ids padded to a multiple of 128 for faster matmuls.
    config.model = dataclasses.asdict(model.modern_config(size, vocab_size=50304,
                                                          n_positions=1024))
    config.data.source = "slimpajama"
    config.data.tokenizer = "gpt2"
    config.data.block_size = 1024
    # SlimPajama-627B's own token shares (%) per redpajama_set_name, as in slimpajama.py.
    config.data.mixture = {"RedPajamaCommonCrawl": 52.2, "RedPajamaC4": 26.7,
                           "RedPajamaGithub": 5.2, "RedPajamaBook": 4.2, "RedPajamaArXiv": 4.6,
                           "RedPajamaWikipedia": 3.8, "RedPajamaStackExchange": 3.3}
    config.data.read_threads = 4
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
