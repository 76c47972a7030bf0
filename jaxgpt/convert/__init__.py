"""Converters between jaxgpt parameters and other ecosystems' checkpoints (see `hf.py`)."""
