"""The newer-component GPT on SlimPajama. Size: --config=configs/modern.py:small (modern-124M).

Rotary positions, RMSNorm, SwiGLU, no biases, grouped-query attention and QK-norm at GPT-2's
parameter budget (see `model.modern_config`); data, optimizer and schedule are those of
configs/slimpajama.py (loaded from it), so the two runs compare the architecture alone.
Each option can be switched back, e.g. `--config.model.qk_norm=False`. HF export refuses
these models (GPT-2 has no names for their weights).
"""

import dataclasses
import importlib.util
import os

import ml_collections

from jaxgpt import model


def _slimpajama():
    """configs/slimpajama.py, loaded by path (config files are loaded by path, not package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slimpajama.py")
    spec = importlib.util.spec_from_file_location("jaxgpt_config_slimpajama", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(size: str = "small") -> ml_collections.ConfigDict:
    config = _slimpajama().get_config(size)
    # The model alone changes; vocabulary (50304) and context (1024) stay those of GPT-2.
    config.model = dataclasses.asdict(model.modern_config(
        size, vocab_size=config.model.vocab_size, n_positions=config.model.n_positions))
    return config
