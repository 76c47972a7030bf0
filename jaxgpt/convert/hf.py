"""HF GPT-2 <-> jaxgpt: the name table, config map, strict import and export, and a CLI.

`python -m jaxgpt.convert.hf export --workdir=RUN --out=DIR [--vocab_size=N]` writes a
directory that `transformers.GPT2LMHeadModel.from_pretrained(DIR)` loads. torch and
transformers are imported inside functions, so `import jaxgpt` works without them.
"""

import argparse
import dataclasses
import json
import logging
import os
import pickle
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt import model

log = logging.getLogger(__name__)

# GPTConfig fields that fix the parameter shapes and the function computed; HF GPT2Config
# uses the same names. Dropout rates are training choices and are not imported.
ARCH_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon")
HUB_PREFIX = "hf:"


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple            # jaxgpt pure-dict path, e.g. ("h", 0, "attn", "c_attn", "kernel")
    hf_name: str           # HF GPT2Model name, e.g. "h.0.attn.c_attn.weight"
    shape: tuple           # jaxgpt shape
    hf_shape: tuple        # HF shape


def table(cfg: model.GPTConfig) -> list[Entry]:
    """Every parameter: jaxgpt path <-> HF name <-> transform.

    The only transform is a row-major reshape between `shape` and `hf_shape`. HF's Conv1D
    stores weights as (in, out), as nnx.Linear and our Dense do, so nothing is transposed.
    The fused `c_attn` [D, 3D] has columns ordered (q|k|v, head, head_dim), which is
    exactly [D, 3, H, K]; `attn.c_proj` [D, D] has rows ordered (head, head_dim): [H, K, D].
    LayerNorm `weight` is our `scale`. The LM head is tied: HF's `lm_head.weight` *is*
    `wte.weight`; it has no entry here, export omits it (as `save_pretrained` does) and
    import accepts it only when it equals `wte.weight`.
    """
    D, H, K, F = cfg.n_embd, cfg.n_head, cfg.head_dim, 4 * cfg.n_embd
    rows = [(("wte", "embedding"), "wte.weight", (cfg.vocab_size, D), None),
            (("wpe", "embedding"), "wpe.weight", (cfg.n_positions, D), None)]
    for i in range(cfg.n_layer):
        rows += [(("h", i) + path, f"h.{i}.{name}", shape, hf_shape) for path, name, shape,
                 hf_shape in [
            (("ln_1", "scale"), "ln_1.weight", (D,), None),
            (("ln_1", "bias"), "ln_1.bias", (D,), None),
            (("attn", "c_attn", "kernel"), "attn.c_attn.weight", (D, 3, H, K), (D, 3 * D)),
            (("attn", "c_attn", "bias"), "attn.c_attn.bias", (3, H, K), (3 * D,)),
            (("attn", "c_proj", "kernel"), "attn.c_proj.weight", (H, K, D), (D, D)),
            (("attn", "c_proj", "bias"), "attn.c_proj.bias", (D,), None),
            (("ln_2", "scale"), "ln_2.weight", (D,), None),
            (("ln_2", "bias"), "ln_2.bias", (D,), None),
            (("mlp", "c_fc", "kernel"), "mlp.c_fc.weight", (D, F), None),
            (("mlp", "c_fc", "bias"), "mlp.c_fc.bias", (F,), None),
            (("mlp", "c_proj", "kernel"), "mlp.c_proj.weight", (F, D), None),
            (("mlp", "c_proj", "bias"), "mlp.c_proj.bias", (D,), None)]]
    rows += [(("ln_f", "scale"), "ln_f.weight", (D,), None),
             (("ln_f", "bias"), "ln_f.bias", (D,), None)]
    return [Entry(path, name, shape, hf_shape or shape) for path, name, shape, hf_shape in rows]


def _keystr(path: tuple) -> str:
    return "".join(f"[{p!r}]" for p in path)


# ---------------------------------------------------------------------------------- config

def config_from_hf(hf: Mapping, source: str) -> model.GPTConfig:
    """GPTConfig from an HF GPT-2 config (a dict); refuses what jaxgpt's GPT-2 can't compute.

    `reorder_and_upcast_attn` is accepted: it only moves HF's attention to float32, where
    jaxgpt computes its softmax anyway. `gelu_pytorch_tanh` is the same function as
    `gelu_new` (the tanh approximation jaxgpt uses).
    """
    refusals = {
        "model_type": (hf.get("model_type"), ("gpt2",)),
        "activation_function": (hf.get("activation_function"), ("gelu_new", "gelu_pytorch_tanh")),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False),
                                            (False,)),
        "add_cross_attention": (hf.get("add_cross_attention", False), (False,)),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), (True,)),
        "n_inner": (hf.get("n_inner"), (None, 4 * hf.get("n_embd", 0))),
    }
    for name, (value, allowed) in refusals.items():
        if value not in allowed:
            raise ValueError(f"{source}: {name}={value!r} is not supported by jaxgpt's GPT-2 "
                             f"(allowed: {', '.join(map(repr, allowed))})")
    missing = [f for f in ARCH_FIELDS if f not in hf]
    if missing:
        raise ValueError(f"{source}: config lacks {', '.join(missing)}")
    return model.GPTConfig(**{f: hf[f] for f in ARCH_FIELDS})


def hf_config(cfg: model.GPTConfig, vocab_size: int, eot_id: int | None) -> dict:
    """The config.json fields of an exported model (GPT2LMHeadModel, tied head)."""
    fields = {f: getattr(cfg, f) for f in ARCH_FIELDS} | {"vocab_size": vocab_size}
    return fields | {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "activation_function": "gelu_new", "n_inner": None, "tie_word_embeddings": True,
        "resid_pdrop": cfg.resid_pdrop, "embd_pdrop": cfg.embd_pdrop,
        "attn_pdrop": cfg.attn_pdrop, "bos_token_id": eot_id, "eos_token_id": eot_id,
        "dtype": "float32"}


def architecture_diff(a: model.GPTConfig, b: model.GPTConfig, fields=ARCH_FIELDS) -> list[str]:
    return [f"{f}: {getattr(a, f)} vs {getattr(b, f)}" for f in fields
            if getattr(a, f) != getattr(b, f)]


# ---------------------------------------------------------------------------------- reading

def _to_numpy(t) -> np.ndarray:
    import torch
    return t.detach().to(device="cpu", dtype=torch.float32).numpy()


def _unreadable(path: str, kind: str, e: Exception) -> ValueError:
    """The error for a weights file its reader can't parse: the readers' own messages omit
    the path, and torch's can be as bare as `[Errno 22] Invalid argument` or `101`."""
    detail = str(e).split(". ")[0].splitlines()[0] if str(e) else ""
    return ValueError(f"{path}: not a readable {kind} file, probably truncated or corrupt "
                      f"({type(e).__name__}{': ' + detail if detail else ''})")


def _read_safetensors(path: str) -> dict:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt") as f:   # not a dict: `in f` does not iterate names
            return {name: _to_numpy(f.get_tensor(name)) for name in f.keys()}  # noqa: SIM118
    except SafetensorError as e:
        raise _unreadable(path, "safetensors", e) from None


def _read_torch_bin(path: str) -> dict:
    """A pytorch_model.bin through the loader that only rebuilds tensors (no code runs)."""
    import torch
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused; its pickle holds more than tensors "
                         f"(weights_only load failed: {str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, KeyError, OSError) as e:
        if isinstance(e, OSError) and e.filename is not None:   # missing, unreadable: named
            raise
        raise _unreadable(path, "PyTorch", e) from None
    if not isinstance(state, Mapping):
        raise TypeError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {name: _to_numpy(t) for name, t in state.items()}


def _shards(index: str) -> list[str]:
    """The shard file names a model.safetensors.index.json lists."""
    with open(index) as f:
        return sorted(set(json.load(f)["weight_map"].values()))


# Weight layouts in the order they are looked for (transformers' order too).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _weight_files(directory: str) -> list[str]:
    single, index, legacy = (os.path.join(directory, f) for f in WEIGHT_FILES)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        return [os.path.join(directory, s) for s in _shards(index)]
    if os.path.isfile(legacy):
        return [legacy]
    raise FileNotFoundError(f"{directory}: no {', '.join(WEIGHT_FILES[:-1])} or "
                            f"{WEIGHT_FILES[-1]}")


def read_dir(directory: str) -> tuple[dict, dict, dict]:
    """(config.json dict, {HF name: float32 array}, {HF name: file it came from})."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} is missing; the architecture comes only "
                                f"from the checkpoint's config")
    with open(config_path) as f:
        raw = json.load(f)
    if raw.get("model_type") != "gpt2":
        raise ValueError(f"{config_path}: model_type={raw.get('model_type')!r}, not 'gpt2'")
    from transformers import GPT2Config
    config = GPT2Config.from_json_file(config_path).to_dict()   # fills omitted defaults
    tensors, origin = {}, {}
    for path in _weight_files(directory):
        read = _read_safetensors if path.endswith(".safetensors") else _read_torch_bin
        for name, array in read(path).items():
            tensors[name], origin[name] = array, path
    return config, tensors, origin


def _hub_dir(name: str) -> str:
    """A hub model's snapshot directory, through transformers' own download and cache.

    Fetches config.json and the first weight layout (WEIGHT_FILES) the repository has, so
    the directory holds what `_weight_files` reads; offline, only cached files count.
    """
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{name}: no such directory (and not a hub name, which is "
                                f"NAME or NAMESPACE/NAME)")
    from transformers.utils import cached_file

    def fetch(filename: str) -> str | None:   # None: the repo (or, offline, the cache) lacks it
        return cached_file(name, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)

    config = cached_file(name, "config.json")   # raises for an unknown or unreachable repo
    if config is None:
        raise FileNotFoundError(f"hub repository {name} has no config.json")
    for layout in WEIGHT_FILES:
        path = fetch(layout)
        if path is None:
            continue
        if layout.endswith(".index.json"):
            missing = [s for s in _shards(path) if fetch(s) is None]
            if missing:
                raise FileNotFoundError(f"hub repository {name}: shards {', '.join(missing)} "
                                        f"listed in {layout} could not be fetched (offline, "
                                        f"they are not in the HF cache)")
        return os.path.dirname(config)
    raise FileNotFoundError(f"hub repository {name} has no weights in a layout jaxgpt reads "
                            f"(tried {', '.join(WEIGHT_FILES)}; offline, only files in the HF "
                            f"cache count)")


# ---------------------------------------------------------------------------------- import

# Causal-mask buffers some GPT-2 checkpoints store next to the weights; not parameters.
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: model.GPTConfig, *,
                   origin: Mapping[str, str] | None = None, source: str = "<memory>"):
    """nnx.State of jaxgpt params from HF tensors; every tensor used, every param filled."""
    origin = origin or {}
    named = {}
    for name, array in tensors.items():
        short = name.removeprefix("transformer.")
        if not _BUFFER.fullmatch(short):
            named[short] = (name, np.asarray(array))
    entries = table(cfg)
    if "lm_head.weight" in named:
        name, head = named.pop("lm_head.weight")
        wte = named.get("wte.weight", (None, None))[1]
        if wte is None or head.shape != wte.shape or not np.array_equal(head, wte):
            raise ValueError(f"{origin.get(name, source)}: {name} differs from wte.weight; "
                             f"jaxgpt ties its LM head to the token embedding")
    expected = {e.hf_name for e in entries}
    missing, unexpected = sorted(expected - named.keys()), sorted(named.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: HF tensors do not match a {cfg.n_layer}-layer GPT-2; "
                         f"missing {missing or 'none'}, unexpected {unexpected or 'none'}")
    pure = {}
    for e in entries:
        name, array = named[e.hf_name]
        if array.shape != e.hf_shape:
            raise ValueError(f"{origin.get(name, source)}: {name} (jaxgpt {_keystr(e.path)}) "
                             f"has shape {array.shape}, expected {e.hf_shape}")
        node = pure
        for key in e.path[:-1]:
            node = node.setdefault(key, {})
        # A copy: asarray may alias the numpy view of a torch tensor, so training that
        # model in place would change these (immutable) params.
        node[e.path[-1]] = jnp.array(array.reshape(e.shape), jnp.float32, copy=True)
    return _state(cfg, pure)


def _state(cfg: model.GPTConfig, pure: dict) -> nnx.State:
    """The nnx.State `nnx.split(GPT(cfg), nnx.Param)` would give, holding `pure`'s arrays."""
    state = model.abstract_params(cfg)
    nnx.replace_by_pure_dict(state, pure)
    return state


def import_gpt2(source, *, config: Mapping | None = None
                ) -> tuple[model.GPTConfig, nnx.State]:
    """(GPTConfig, params) from an HF GPT-2.

    `source` is a hub name (`gpt2`, `hf:gpt2-medium`, `distilgpt2`), a directory written
    by `save_pretrained`, an in-memory `GPT2LMHeadModel`/`GPT2Model`, or a state dict (then
    `config`, the HF config as a dict, is required).
    """
    if isinstance(source, str):
        name = os.path.expanduser(source.removeprefix(HUB_PREFIX))   # hf:~/... too
        directory = name if os.path.isdir(name) else _hub_dir(name)
        hf, tensors, origin = read_dir(directory)
        cfg = config_from_hf(hf, os.path.join(directory, "config.json"))
        return cfg, params_from_hf(tensors, cfg, origin=origin, source=directory)
    if isinstance(source, Mapping):
        if config is None:
            raise ValueError("importing a state dict needs its HF config (config=...)")
        hf, state = dict(config), source
    else:   # a torch module with an HF config
        hf, state = source.config.to_dict(), source.state_dict()
    cfg = config_from_hf(hf, "<memory config>")
    return cfg, params_from_hf({k: _to_numpy(v) if not isinstance(v, np.ndarray) else v
                                for k, v in state.items()}, cfg)


def init_params(source: str, cfg: model.GPTConfig, fresh: nnx.State) -> nnx.State:
    """HF weights in place of freshly initialized `fresh` params of architecture `cfg`.

    The HF architecture must equal cfg's, except that cfg.vocab_size may be larger (a
    padded vocabulary): the extra wte rows keep their fresh initialization.
    """
    if model.non_gpt2_options(cfg):
        raise ValueError(f"init_from {source}: HF GPT-2 weights do not fit config.model with "
                         f"{', '.join(model.non_gpt2_options(cfg))}")
    hf_cfg, params = import_gpt2(source)
    diff = architecture_diff(hf_cfg, cfg, [f for f in ARCH_FIELDS if f != "vocab_size"])
    if hf_cfg.vocab_size > cfg.vocab_size:
        diff.append(f"vocab_size: {hf_cfg.vocab_size} vs {cfg.vocab_size} (the model's may "
                    f"only be larger)")
    if diff:
        raise ValueError(f"init_from {source} does not fit config.model: "
                         f"{'; '.join(diff)} (HF vs config)")
    pure = nnx.to_pure_dict(params)
    fresh_wte = nnx.to_pure_dict(fresh)["wte"]["embedding"]
    pure["wte"]["embedding"] = jnp.concatenate(
        [pure["wte"]["embedding"], fresh_wte[hf_cfg.vocab_size:].astype(jnp.float32)])
    if cfg.vocab_size > hf_cfg.vocab_size:
        log.info("init_from %s: wte rows %d..%d are vocabulary padding, initialized fresh",
                 source, hf_cfg.vocab_size, cfg.vocab_size - 1)
    return _state(cfg, pure)


# ---------------------------------------------------------------------------------- export

def _pure(params) -> dict:
    return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def hf_tensors(cfg: model.GPTConfig, params, vocab_size: int | None = None) -> dict:
    """{HF name: float32 array} (GPT2LMHeadModel names) of the first `vocab_size` tokens."""
    if model.non_gpt2_options(cfg):
        raise ValueError(f"HF GPT-2 has no mapping for {', '.join(model.non_gpt2_options(cfg))}"
                         f"; only a GPT-2-architecture model can be exported")
    vocab_size = cfg.vocab_size if vocab_size is None else vocab_size
    if not 1 <= vocab_size <= cfg.vocab_size:
        raise ValueError(f"vocab_size {vocab_size} must be in [1, model vocab_size "
                         f"{cfg.vocab_size}]")
    pure = _pure(params)
    out = {}
    for e in table(cfg):
        node = pure
        for key in e.path:
            node = node[key]
        array = np.asarray(node, np.float32)
        if array.shape != e.shape:
            raise ValueError(f"params{_keystr(e.path)} has shape {array.shape}, expected "
                             f"{e.shape} for {cfg}")
        if e.hf_name == "wte.weight":
            array = array[:vocab_size]
        out["transformer." + e.hf_name] = np.ascontiguousarray(array.reshape(
            (vocab_size, cfg.n_embd) if e.hf_name == "wte.weight" else e.hf_shape))
    return out


def export_gpt2(out_dir: str, cfg: model.GPTConfig, params, *,
                vocab_size: int | None = None, tokenizer=None) -> str:
    """Write config.json + model.safetensors (+ the GPT-2 BPE files) into a new `out_dir`.

    The directory is assembled beside `out_dir` and renamed into place, so a failure never
    leaves a half-written export; an existing non-empty `out_dir` is refused.
    """
    from safetensors.numpy import save_file
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new --out")
    vocab_size = cfg.vocab_size if vocab_size is None else vocab_size
    tensors = hf_tensors(cfg, params, vocab_size)
    if vocab_size < cfg.vocab_size:
        log.info("exporting the first %d of %d wte rows (the rest is vocabulary padding)",
                 vocab_size, cfg.vocab_size)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    # Not tempfile.mkdtemp, whose 0700 the export would keep: os.mkdir gives the mode
    # os.makedirs(out_dir) would (umask), and an existing empty out_dir keeps its own.
    tmp = os.path.join(parent, f".export-{secrets.token_hex(8)}")
    os.mkdir(tmp)
    try:
        if os.path.isdir(out_dir):
            os.chmod(tmp, stat.S_IMODE(os.stat(out_dir).st_mode))
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        eot = tokenizer.eot_id if tokenizer is not None else None
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(cfg, vocab_size, eot), f, indent=2)
        if tokenizer is not None and hasattr(tokenizer, "save"):
            # transformers' default model_max_length (1e30) would never truncate.
            tokenizer.save(tmp, model_max_length=cfg.n_positions)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    log.info("wrote HF GPT-2 (%d layers, vocab %d) to %s", cfg.n_layer, vocab_size, out_dir)
    return out_dir


def export_checkpoint(workdir: str, out_dir: str, *, vocab_size: int | None = None,
                      step: int | None = None) -> str:
    """A jaxgpt run's checkpoint -> an HF directory.

    The true vocabulary size comes from `vocab_size` or, when that is None, from the run's
    tokenizer (recorded in the checkpoint); GPT-2 BPE runs also get their tokenizer files.
    """
    from jaxgpt import checkpoint, tokenizer
    cfg, params, step, meta = checkpoint.load_params(workdir, step)
    try:
        tok = tokenizer.from_meta(meta)
    except (OSError, ValueError, KeyError) as e:
        if vocab_size is None:
            raise ValueError(f"{workdir}: the run's tokenizer can't be loaded ({e}); pass "
                             f"--vocab_size to say how many wte rows are real") from None
        log.warning("%s: exporting without tokenizer files (%s)", workdir, e)
        tok = None
    if tok is not None and vocab_size is not None and vocab_size != tok.vocab_size:
        raise ValueError(f"--vocab_size {vocab_size} disagrees with the run's tokenizer "
                         f"({tok.vocab_size} tokens)")
    if tok is not None and not isinstance(tok, tokenizer.Gpt2Bpe):
        log.warning("the run used a %s tokenizer; transformers can't load it, so the "
                    "export has no tokenizer files", type(tok).__name__)
    log.info("exporting %s step %d", workdir, step)
    return export_gpt2(out_dir, cfg, params,
                       vocab_size=tok.vocab_size if vocab_size is None else vocab_size,
                       tokenizer=tok if isinstance(tok, tokenizer.Gpt2Bpe) else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxgpt.convert.hf",
                                     description="HF GPT-2 interop.")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="a jaxgpt checkpoint -> an HF GPT-2 directory")
    export.add_argument("--workdir", required=True, help="the run directory")
    export.add_argument("--out", required=True, help="new directory for the HF model")
    export.add_argument("--vocab_size", type=int, default=None,
                        help="real vocabulary size (default: the run's tokenizer's)")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        export_checkpoint(args.workdir, args.out, vocab_size=args.vocab_size, step=args.step)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
