"""jaxgpt: GPT-2 training, evaluation and sampling in JAX/Flax."""

__version__ = "0.1.0"
