"""The one schema of run configs: every group and field, with its meaning.

`configs/*.py` start from `base_config()` and change values only, so every config has the
same fields and `--config.x.y=` overrides work alike everywhere.
"""

import dataclasses
import difflib
import importlib.util
import inspect
import logging
import os
import re
import sys

import ml_collections
from absl import app

from jaxgpt import model

log = logging.getLogger(__name__)
COMPILATION_CACHE = "~/.cache/jaxgpt/xla"


def command_logging() -> None:
    """INFO logging for the evaluation commands, without orbax's lines on every restore
    or JAX's on the backends it looked for and did not find."""
    logging.getLogger().setLevel(logging.INFO)
    for quiet in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(quiet).setLevel(logging.WARNING)


def use_compilation_cache(path: str = COMPILATION_CACHE) -> str | None:
    """Turn on JAX's persistent compilation cache at `path` (before anything compiles), so
    a later process of the same shapes loads its compiled programs instead of compiling them
    again; $JAX_COMPILATION_CACHE_DIR, which JAX reads itself, wins. Returns the folder in
    use (None: off)."""
    import jax
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if not path:
        return None
    path = os.path.expanduser(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:    # a read-only home, say: compile as without a cache
        log.warning("compilation cache %s cannot be created (%s); compiling without it", path,
                    e)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def load_file(spec: str) -> ml_collections.ConfigDict:
    """The config of `--config=FILE[:size]`: FILE's `get_config(size)`, as ml_collections'
    config flag loads it, but a missing file or an unknown size is one ValueError or
    FileNotFoundError naming it (the flag would raise a traceback)."""
    path, has_size, size = spec.partition(":")
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        others = sorted(n for n in os.listdir(folder) if n.endswith(".py")
                        and n != "__init__.py") if os.path.isdir(folder) else []
        raise FileNotFoundError(f"config file {path} does not exist" + (
            f" ({folder} holds {', '.join(others)})" if others else ""))
    module_spec = importlib.util.spec_from_file_location("jaxgpt_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if get_config is None:
        raise ValueError(f"config file {path} defines no get_config()")
    if has_size and not inspect.signature(get_config).parameters:
        raise ValueError(f"{spec}: config file {path} takes no :size")
    try:
        return get_config(*([size] if has_size else []))
    except ValueError as e:   # model.gpt2_config's: the size and the valid ones
        raise ValueError(f"{spec}: {e}") from None


def check_override(config: ml_collections.ConfigDict, field: str) -> None:
    """Raise ValueError unless `field` (`train.steps` of `--config.train.steps=5`) names a
    field of `config`, with the nearest name when one is close."""
    node, seen = config, []
    for part in field.split("."):
        name = part.split("[", 1)[0]    # `prompts[0]` indexes a sequence field
        fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else None
        if fields is None:
            raise ValueError(f"--config.{field}: {'.'.join(seen)} is a value, not a group")
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = (f'did you mean "{close[0]}"?' if close else
                    f"{'.'.join(seen) or 'the config'} has {', '.join(fields)}")
            raise ValueError(f"--config.{field}: no such field ({hint})")
        if name != part:
            return
        node = node[name]
        seen.append(name)


def base_config(size: str = "small", **model_overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = dataclasses.asdict(model.gpt2_config(size, **model_overrides))

    config.data = ml_collections.ConfigDict()
    config.data.source = "text"            # text | wikitext | slimpajama
    # File, directory or glob; None = the running interpreter's standard library sources.
    config.data.path = ml_collections.config_dict.placeholder(str)
    config.data.block_size = 128           # tokens per training window (<= n_positions)
    config.data.val_fraction = 0.05        # without a validation split: of each source, its tail
    # SentencePiece .model to use (None = train one with model.vocab_size pieces, cached as
    # WORKDIR/tokenizer.model), or for gpt2 the folder with encoder.json and vocab.bpe.
    config.data.tokenizer_path = ml_collections.config_dict.placeholder(str)
    config.data.tokenizer = "sentencepiece"   # sentencepiece | gpt2 (tokenizer_path = BPE dir)
    # A directory written by `python -m jaxgpt.shards prepare` (token shards + manifest.json);
    # when set, source/path are not read. None = prepare the inputs once into WORKDIR/data/.
    config.data.prepared = ml_collections.config_dict.placeholder(str)
    # A malformed/non-UTF-8/text-less record, truncated .zst or file without documents:
    # 'error' stops naming file:line; 'skip' drops it and counts it in metrics.jsonl.
    config.data.on_bad_record = "error"    # error | skip
    # Sampling weight per SlimPajama redpajama_set_name (relative); empty = every window
    # equally likely (the data's natural proportions). A source present needs a weight.
    config.data.mixture = ml_collections.ConfigDict()
    # Documents per split to prepare, 0 = all: exact for HF streams; files are read whole
    # until the count is reached (a quick run on part of a local corpus).
    config.data.max_documents = 0
    # Validation documents to prepare, 0 = all (and at most max_documents). Evaluation reads
    # eval.batches batches per source, so a long validation split (SlimPajama's holds 0.5B
    # tokens) need not be tokenized whole; the train split is not capped by it. For sources
    # with a validation split of their own (SlimPajama, WikiText), not 'text'.
    config.data.val_max_documents = 0
    config.data.read_threads = 2           # grain threads reading/tokenizing and serving windows
    config.data.prefetch = 4               # batches buffered ahead of the trainer
    # grain worker processes (0 = read in the trainer process); the iterator state saved in
    # checkpoints depends on it, so keep it fixed across a resume.
    config.data.worker_count = 0
    # Train straight from data.path (or the HF stream): documents are tokenized in order in
    # a background thread while training, so nothing is prepared up front but the validation
    # split (which streaming needs). Process p of N takes every N-th document; windows are
    # shuffled in blocks of shuffle_windows. max_documents caps each pass.
    config.data.streaming = False
    config.data.shuffle_windows = 8192

    # Start a fresh run from HF GPT-2 weights: `hf:gpt2` (hub name) or a save_pretrained
    # directory; None = random init. Its architecture must equal config.model's (vocab_size
    # may be larger: the padding rows stay randomly initialized). Ignored when resuming.
    config.init_from = ml_collections.config_dict.placeholder(str)

    config.train = ml_collections.ConfigDict()
    config.train.seed = 0
    config.train.steps = 600               # optimizer steps
    config.train.batch_size = 32           # windows per optimizer step (global)
    config.train.grad_accum = 1            # micro-batches per step (batch_size divisible)
    config.train.log_every = 50            # steps between metrics lines
    config.train.nonfinite = "halt"        # NaN/Inf loss or grads: halt | skip (the update)
    config.train.max_consecutive_skips = 3  # skip mode: halt after this many in a row
    # Step watchdog: exit when no step finishes for max(min_s, factor * median step time),
    # or an eval/save runs past max(min_s, factor * its longest earlier run); 0 disables it.
    config.train.watchdog_min_s = 60.0
    config.train.watchdog_factor = 10.0
    # JAX's persistent compilation cache (`python -m jaxgpt.main` only): a restart, a resume
    # or another run of the same shapes loads its compiled steps from here instead of
    # compiling them again. Steps compiled in under a second are not kept, the rest until
    # the folder is deleted (any time); $JAX_COMPILATION_CACHE_DIR, when set, wins; "" = off.
    config.train.compilation_cache = COMPILATION_CACHE
    # Fault injection for tests only: poison loss and grads of steps
    # [inject_nan_at_step, inject_nan_at_step + inject_nan_steps); hang before step
    # inject_hang_at_step. -1 = off.
    config.train.inject_nan_at_step = -1
    config.train.inject_nan_steps = 1
    config.train.inject_hang_at_step = -1

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 2e-3      # peak
    config.optim.min_lr_ratio = 0.1        # final learning rate, as a fraction of the peak
    config.optim.warmup_steps = 50
    config.optim.schedule = "cosine"       # or "wsd": warm-up, stable peak, linear decay
    config.optim.decay_steps = 0           # cosine: 0 = until train.steps; wsd: 0 = last 20%
    config.optim.b1 = 0.9
    config.optim.b2 = 0.95
    config.optim.eps = 1e-8
    config.optim.weight_decay = 0.1        # >= 2-D weights only
    config.optim.grad_clip = 1.0           # global norm; 0 disables
    # "muon": Muon on the blocks' weight matrices (same lr and decay: updates at AdamW's RMS),
    # AdamW without decay on embeddings, norms and biases.
    config.optim.optimizer = "adamw"
    config.optim.muon_momentum = 0.95

    config.eval = ml_collections.ConfigDict()
    config.eval.every = 200                # steps between evals (and the last step); 0 = never
    config.eval.batch_size = 32
    config.eval.batches = 0                # 0 = the whole validation split
    # Benchmarks also scored at every eval, as `python -m jaxgpt.tasks` scores them:
    # "hellaswag=FILE,lambada=FILE" (a task without =FILE is downloaded once); "" = none.
    config.eval.tasks = ""
    config.eval.tasks_limit = 0            # first N examples of each task; 0 = all

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every = 200          # steps between checkpoints (the last is saved)
    config.checkpoint.keep = 3             # newest checkpoints kept (plus the best val_loss)
    config.checkpoint.async_save = True    # write in the background while training goes on
    # Resume from this step instead of the latest; newer steps are moved aside to
    # WORKDIR/checkpoints.rolledback/. None = the latest good step.
    config.checkpoint.restore_step = ml_collections.config_dict.placeholder(int)
    # Resume even if model/data/tokenizer/seed/batch fields differ from the checkpoint's.
    config.checkpoint.allow_config_change = False

    config.mesh = ml_collections.ConfigDict()
    config.mesh.shape = (-1, 1, 1)         # (data, fsdp, tensor); one -1 = the rest
    config.mesh.rules = "dp"               # a key of sharding.RULES

    config.report = ml_collections.ConfigDict()
    config.report.tensorboard = True       # event files beside metrics.jsonl (tensorboard --logdir)
    # Weights & Biases project to log to (needs `pip install wandb`); None = off.
    config.report.wandb_project = ml_collections.config_dict.placeholder(str)

    config.sample = ml_collections.ConfigDict()
    config.sample.prompts = ("def ", "import os\n", "class Parser:\n    ")
    config.sample.max_new_tokens = 64
    config.sample.temperature = 0.8
    config.sample.top_k = 40
    return config


def check_config_args(args: list[str]) -> None:
    """Load the `--config` file and check that every `--config.x.y` override names a field,
    raising ValueError/FileNotFoundError in one line; config_flags would raise a traceback
    for a missing file, an unknown size or a misspelled field."""
    spec, overrides = None, []
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if m := re.fullmatch(r"--?config(?:=(.*))?", arg, re.DOTALL):
            spec = m[1] if m[1] is not None else (args[i + 1] if i + 1 < len(args) else None)
        elif m := re.match(r"--?(?:no)?config\.([^=]+)", arg):
            overrides.append(m[1])
    if spec is None:    # absl reports the missing flag
        return
    config = load_file(spec)
    for field in overrides:
        check_override(config, field)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing after the config checks, whose errors exit 2 with one line: the
    `flags_parser` of every command taking `--config` (`app.run(main, flags_parser=...)`)."""
    try:
        check_config_args(argv[1:])
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return app.parse_flags_with_usage(argv)
