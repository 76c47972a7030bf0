"""The sampling command line, `python -m jaxgpt.sample`: load a run's checkpoint or a
HuggingFace GPT-2, decode prompts with any method, stream row 0, report tokens/s."""

import os
import sys

import numpy as np

from jaxgpt import sample


def read_prompts(path: str) -> list[str]:
    """One prompt per line of a UTF-8 file; blank (empty or whitespace-only) lines are
    skipped, so prompts are numbered from 0 over the other lines."""
    with open(path, "rb") as f:
        raw = f.read().split(b"\n")
    prompts = []
    for i, line in enumerate(raw, 1):
        try:
            text = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} line {i}: not UTF-8 ({e.reason} at byte {e.start})") from e
        if text.strip():
            prompts.append(text)
    if not prompts:
        raise ValueError(f"{path}: no prompts (blank lines are skipped)")
    return prompts


def parse_ban(text: str) -> tuple[int, ...]:
    """The --ban flag: comma-separated token ids (blank items are skipped)."""
    ids = []
    for item in text.split(","):
        if item.strip():
            try:
                ids.append(int(item))
            except ValueError:
                raise ValueError(f"--ban: {item.strip()!r} is not a token id (give "
                                 f"comma-separated integers, e.g. --ban=198,50256)") from None
            if ids[-1] < 0:
                raise ValueError(f"--ban: token id {ids[-1]} is negative")
    return tuple(ids)


def parse_args(argv=None):
    import argparse
    ap = argparse.ArgumentParser(prog="python -m jaxgpt.sample", description=sample.__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a training run's workdir")
    src.add_argument("--hf", help="a HuggingFace GPT-2 name (gpt2, gpt2-medium, ...) or folder")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    text = ap.add_mutually_exclusive_group()
    text.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    text.add_argument("--prompts_file",
                      help="UTF-8 file, one prompt per line; blank lines are skipped")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=1,
                    help="prompts decoded together; a lone prompt streams token by token; "
                         "with several prompts each output starts with '--- prompt N'")
    ap.add_argument("--seed", type=int, default=0,
                    help="in [0, 2**32); each batch uses seed + its first prompt's number")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--schedule", default="constant", choices=sample.SCHEDULES)
    ap.add_argument("--final_temperature", type=float, default=None,
                    help="the temperature a linear or exponential --schedule ends at")
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--min_p", type=float, default=0.0)
    ap.add_argument("--repetition_penalty", type=float, default=1.0)
    ap.add_argument("--no_repeat_ngram_size", type=int, default=0)
    ap.add_argument("--ban", default="", help="comma-separated token ids never to generate")
    ap.add_argument("--num_beams", type=int, default=1)
    ap.add_argument("--length_penalty", type=float, default=1.0)
    ap.add_argument("--early_stopping", default="false", choices=("true", "false", "never"))
    ap.add_argument("--num_return_sequences", type=int, default=1)
    ap.add_argument("--truncate", action="store_true",
                    help="left-truncate prompts longer than the context allows")
    return ap.parse_args(argv)


def method_from_args(args):
    """The sampling method the flags ask for; flags that would be ignored are errors."""
    sampling_flags = (args.temperature != 1.0 or args.top_k or args.top_p != 1.0 or args.min_p
                      or args.schedule != "constant" or args.final_temperature is not None)
    if args.num_beams < 1:
        raise ValueError(f"--num_beams must be >= 1, got {args.num_beams}")
    if args.num_beams > 1:
        if sampling_flags:
            raise ValueError("beam search is deterministic here: it cannot combine with "
                             "--temperature/--top_k/--top_p/--min_p/--schedule/"
                             "--final_temperature")
        early = {"true": True, "false": False, "never": "never"}[args.early_stopping]
        return sample.Beam(args.num_beams, args.length_penalty, early, args.num_return_sequences)
    if args.num_return_sequences != 1 or args.length_penalty != 1.0 or \
            args.early_stopping != "false":
        raise ValueError("--num_return_sequences/--length_penalty/--early_stopping need "
                         "--num_beams > 1")
    if args.temperature == 0:
        ignored = [f for f, on in (("--top_k", args.top_k), ("--top_p", args.top_p != 1.0),
                                   ("--min_p", args.min_p),
                                   ("--schedule", args.schedule != "constant"),
                                   ("--final_temperature", args.final_temperature is not None))
                   if on]
        if ignored:
            raise ValueError(f"--temperature=0 is greedy: {'/'.join(ignored)} would be ignored")
        return sample.Greedy()
    if args.schedule != "constant" and args.final_temperature is None:
        raise ValueError(f"--schedule={args.schedule} needs --final_temperature (the "
                         f"temperature it anneals to)")
    if args.schedule == "constant" and args.final_temperature is not None:
        raise ValueError("--final_temperature needs --schedule=linear or "
                         "--schedule=exponential (with the constant schedule it would be "
                         "ignored)")
    return sample.Sampling(args.temperature, args.top_k, args.top_p, args.min_p, args.schedule,
                           args.final_temperature)


def load_model(args):
    """(cfg, params, tokenizer) from a run's checkpoint or a HuggingFace GPT-2."""
    from jaxgpt import tokenizer
    if args.checkpoint:
        from jaxgpt import checkpoint
        if not os.path.isdir(args.checkpoint):
            raise ValueError(f"--checkpoint {args.checkpoint} is not a directory")
        cfg, params, _, meta = checkpoint.load_params(args.checkpoint, args.step)
        return cfg, params, tokenizer.from_meta(meta)
    from jaxgpt.convert import hf  # the HF mapper (import_gpt2)
    cfg, params = hf.import_gpt2(args.hf)
    return cfg, params, tokenizer.load("gpt2", args.hf)


class _Streamer:
    """Prints the prompt, then row 0's text as the decode loop produces it (called from
    inside the scan), so nothing is printed for a prompt that `generate` refuses."""

    def __init__(self, tok, out, prompt: str):
        self.tok, self.out, self.ids, self.shown, self.done = tok, out, [], "", False
        self.prompt = prompt

    def start(self) -> None:
        if self.prompt is not None:
            self.out.write(self.prompt)
            self.out.flush()
            self.prompt = None

    def __call__(self, tokens_B):
        self.start()
        token = int(np.asarray(tokens_B)[0])
        if self.done or token == self.tok.eot_id:
            self.done = True
            return
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):    # wait for the rest of a multi-byte character
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text


def check_args(args):
    """(method, penalties, prompt texts) from the flags; every check that needs no model."""
    method = method_from_args(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    penalties = sample.Penalties(args.repetition_penalty, args.no_repeat_ngram_size,
                                 parse_ban(args.ban))
    texts = read_prompts(args.prompts_file) if args.prompts_file else (args.prompt or [""])
    # Each batch samples with --seed plus its first prompt's number, all below 2**32.
    last = (len(texts) - 1) // args.batch_size * args.batch_size
    if not 0 <= args.seed < 2**32 - last:
        why = f" (the batch from prompt {last} uses seed + {last})" if last else ""
        raise ValueError(f"--seed must be in [0, {2**32 - last}), got {args.seed}{why}")
    return method, penalties, texts


def check_lengths(args, cfg, prompts: list[list[int]]) -> None:
    """Every prompt fits the context with --max_new_tokens (or --truncate cuts it), checked
    before the first one is decoded and named by its place among all prompts."""
    room = cfg.n_positions - args.max_new_tokens
    if room < 1:
        raise ValueError(f"--max_new_tokens={args.max_new_tokens} leaves no room for a prompt "
                         f"in the model's context of {cfg.n_positions} tokens")
    for i, p in enumerate(prompts):
        if len(p) > room and not args.truncate:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with --max_new_tokens="
                             f"{args.max_new_tokens} the model's context of {cfg.n_positions} "
                             f"allows {room} (--truncate keeps the last {room})")


def run_cli(args, cfg, params, tok, out=None, checked=None):
    """Generate for every prompt the flags give; a chunk of one prompt streams. With several
    prompts every output starts with `--- prompt N`, however they are batched. `checked`:
    what check_args(args) returned, where the caller has run it already."""
    out = out or sys.stdout
    method, penalties, texts = checked or check_args(args)
    prompts = [tok.encode(t) for t in texts]
    check_lengths(args, cfg, prompts)
    for start in range(0, len(texts), args.batch_size):
        chunk = texts[start:start + args.batch_size]
        one_row = len(chunk) == 1 and not isinstance(method, sample.Beam)
        header = f"--- prompt {start}\n" if len(texts) > 1 else ""
        streamer = _Streamer(tok, out, header + chunk[0]) if one_row else None
        stats: dict = {}
        rows = sample.generate(cfg, params, prompts[start:start + args.batch_size],
                               max_new_tokens=args.max_new_tokens, method=method,
                               penalties=penalties, seed=args.seed + start, eot_id=tok.eot_id,
                               n_valid_vocab=tok.vocab_size, truncate=args.truncate,
                               stream=streamer, stats=stats)
        per = len(rows) // len(chunk)
        for i, row in enumerate(rows):
            if streamer:
                streamer.start()
                out.write(tok.decode(row)[len(streamer.shown):] + "\n")
            else:
                out.write(f"--- prompt {start + i // per}\n{chunk[i // per]}{tok.decode(row)}\n")
        n_new = sum(len(r) for r in rows)
        out.write(f"[{n_new} tokens, {n_new / max(stats['decode_s'], 1e-9):.1f} tokens/s decode, "
                  f"prefill {stats['prefill_s']:.3f}s, compile {stats.get('compile_s', 0):.1f}s]\n")
        out.flush()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        checked = check_args(args)    # first: bad flags or files never load a model
        cfg, params, tok = load_model(args)
        run_cli(args, cfg, params, tok, checked=checked)
    except (ValueError, OSError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
