"""HF PyTorch GPT-2 and jaxgpt side by side on one token batch: where do they diverge?

`python -m jaxgpt.compare --hf=gpt2|DIR [--checkpoint=RUN] --tolerance=1e-4` prints the max
|difference| of the residual stream after the embeddings and after every block (an attention
or MLP mismatch shows up at the first layer that differs), then max and mean |Δlogit|, top-1
agreement and KL(HF || jaxgpt). It exits 1 when max |Δlogit| exceeds the tolerance.
"""

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt import model


def left_padded_batch(vocab: int, batch: int, length: int, seed: int,
                      pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens [B, T] and a mask [B, T] whose row i has min(i * pad, T - 1) left pads."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length))
    n_pad = np.minimum(np.arange(batch) * pad, length - 1)
    mask = np.arange(length)[None, :] >= n_pad[:, None]
    return tokens, mask


def positions_of(mask: np.ndarray) -> np.ndarray:
    """Each real token's position counts real tokens before it (left padding skipped)."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def hf_forward(hf_model, tokens: np.ndarray, mask: np.ndarray):
    """(logits [B, T, V], [hidden [B, T, D]] * (L + 1)) of a transformers GPT-2, float32."""
    import torch
    with torch.no_grad():
        out = hf_model(input_ids=torch.as_tensor(tokens),
                       attention_mask=torch.as_tensor(mask.astype(np.int64)),
                       position_ids=torch.as_tensor(positions_of(mask)),
                       output_hidden_states=True)
    return out.logits.float().numpy(), [h.float().numpy() for h in out.hidden_states]


def jax_forward(cfg: model.GPTConfig, params, tokens: np.ndarray, mask: np.ndarray):
    """(logits [B, T, V], [hidden [B, T, D]] * (L + 1)) of jaxgpt, at full float32 precision."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: model.GPT(cfg, rngs=nnx.Rngs(0))))
    gpt = nnx.merge(graphdef, params)
    with jax.default_matmul_precision("highest"):
        logits, _, hidden = gpt(jnp.asarray(tokens), positions=jnp.asarray(positions_of(mask)),
                                attention_mask=jnp.asarray(mask), return_hidden=True)
    return np.asarray(logits), [np.asarray(h) for h in hidden]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def differences(hf_out, jax_out, mask: np.ndarray) -> dict:
    """Statistics over real (unmasked) positions; logits are compared on HF's vocabulary
    (a jaxgpt model with a padded vocabulary has extra columns, which are dropped)."""
    (hf_logits, hf_hidden), (jx_logits, jx_hidden) = hf_out, jax_out
    if len(hf_hidden) != len(jx_hidden):
        raise ValueError(f"HF has {len(hf_hidden) - 1} layers, jaxgpt {len(jx_hidden) - 1}")
    V = hf_logits.shape[-1]
    a, b = hf_logits[mask], jx_logits[mask][:, :V]          # [N, V]
    delta = np.abs(a.astype(np.float64) - b)
    logp, logq = _log_softmax(a), _log_softmax(b)
    return {
        "hidden_max": [float(np.abs(h - j)[mask].max()) for h, j in zip(hf_hidden, jx_hidden)],
        "max_abs": float(delta.max()), "mean_abs": float(delta.mean()),
        "top1": float((a.argmax(-1) == b.argmax(-1)).mean()),
        "kl": float((np.exp(logp) * (logp - logq)).sum(-1).mean()),
        "tokens": int(mask.sum())}


def format_report(stats: dict) -> str:
    n = len(stats["hidden_max"]) - 1
    names = ["embeddings"] + [f"h.{i}" for i in range(n - 1)] + [f"h.{n - 1} + ln_f"]
    lines = [f"{'residual stream after':<22} max |Δ|"]
    lines += [f"  {name:<20} {d:.3e}" for name, d in zip(names, stats["hidden_max"])]
    lines.append(f"logits over {stats['tokens']} tokens: max |Δ| {stats['max_abs']:.3e}, "
                 f"mean |Δ| {stats['mean_abs']:.3e}, top-1 agreement {stats['top1']:.2%}, "
                 f"KL(HF || jaxgpt) {stats['kl']:.3e} nats")
    return "\n".join(lines)


def _load_hf_model(source: str):
    import torch
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(source, dtype=torch.float32).eval()


def _load_jaxgpt(args, hf_model):
    from jaxgpt.convert import hf
    if args.checkpoint is None:
        return hf.import_gpt2(args.hf)
    from jaxgpt import checkpoint
    cfg, params, _, _ = checkpoint.load_params(args.checkpoint)
    # A parity check of weights and architecture: float32 like the PyTorch side, whatever
    # compute dtype the run trained in (its params are float32 either way).
    cfg = dataclasses.replace(cfg, dtype="float32")
    hf_cfg = hf.config_from_hf(hf_model.config.to_dict(), args.hf)
    diff = hf.architecture_diff(hf_cfg, cfg, [f for f in hf.ARCH_FIELDS if f != "vocab_size"])
    if cfg.vocab_size < hf_cfg.vocab_size:
        diff.append(f"vocab_size: {hf_cfg.vocab_size} vs {cfg.vocab_size}")
    if diff:
        raise ValueError(f"{args.checkpoint} is not shaped like {args.hf}: {'; '.join(diff)} "
                         f"(HF vs checkpoint)")
    return cfg, params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxgpt.compare", description=__doc__)
    parser.add_argument("--hf", required=True, help="hub name (gpt2) or save_pretrained dir")
    parser.add_argument("--checkpoint", default=None,
                        help="jaxgpt run dir (default: the HF weights imported)")
    parser.add_argument("--tolerance", type=float, required=True, help="max |Δlogit| allowed")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--pad", type=int, default=0, help="left pads added per row")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        hf_model = _load_hf_model(args.hf)
        cfg, params = _load_jaxgpt(args, hf_model)
        if not 1 <= args.seq_len <= cfg.n_positions:
            raise ValueError(f"--seq_len {args.seq_len} must be in [1, {cfg.n_positions}]")
        tokens, mask = left_padded_batch(hf_model.config.vocab_size, args.batch, args.seq_len,
                                         args.seed, args.pad)
        stats = differences(hf_forward(hf_model, tokens, mask),
                            jax_forward(cfg, params, tokens, mask), mask)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(stats))
    if not stats["max_abs"] <= args.tolerance:
        print(f"FAIL: max |Δlogit| {stats['max_abs']:.3e} > tolerance {args.tolerance:g}")
        return 1
    print(f"OK: max |Δlogit| within {args.tolerance:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
