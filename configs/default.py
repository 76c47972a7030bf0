"""A small GPT trained on the Python standard library's own sources: no download needed.

`python -m jaxgpt.main --config=configs/default.py --workdir=runs/default` finishes in a few
minutes on 2 CPU cores. `--config.data.path=/some/file_or_glob` trains on your text instead.
"""

import ml_collections

from jaxgpt import config as base


def get_config() -> ml_collections.ConfigDict:
    # 4 layers, 4 heads, 128 wide; a 4096-piece SentencePiece vocabulary trained on the corpus.
    config = base.base_config("mini", vocab_size=4096, n_positions=128)
    config.train.steps = 800
    config.train.batch_size = 32
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 50
    config.eval.every = 200
    config.checkpoint.every = 200
    config.sample.prompts = ("def ", "import os\n", "class Parser:\n    ")
    return config
