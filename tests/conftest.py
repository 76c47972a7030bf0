"""Test set-up: 8 CPU devices (sharding tests), strict rank promotion, shared fixtures."""

import os

import jax
import pytest

# Nothing reaches the HF hub from a test: a stray request fails at once, not after retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def tiny_cfg():
    from jaxgpt import model
    return model.GPTConfig(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4)


@pytest.fixture(scope="session")
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"reference data folder {SHARED_DATA} is absent")
    return SHARED_DATA
