"""Human-facing output: the training progress line and sample blocks.

The only module that formats for people; everything else logs numbers.
"""


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_bar(fraction: float, width: int = 24) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    full = int(fraction * width)
    return "[" + "#" * full + "." * (width - full) + "]"


def progress_line(m: dict) -> str:
    """One console line from a metrics record (see train.train_and_evaluate)."""
    line = (f"{progress_bar(m['step'] / m['total_steps'])} step {m['step']}/{m['total_steps']}"
            f" | loss {m['loss']:.4f} | lr {m['lr']:.2e} | gnorm {m['grad_norm']:.2f}"
            f" | {m['tokens_per_s']:,.0f} tok/s | {m['samples_per_s']:.1f} samples/s"
            f" | ~{m['epoch']:.2f} epochs | ETA {format_duration(m['eta_s'])}")
    if m.get("mfu") is not None:   # None where the devices' peak FLOP/s is unknown
        line += f" | MFU {100 * m['mfu']:.1f}%"
    return line


def eval_line(m: dict) -> str:
    return (f"eval @ step {m['step']}: val loss {m['val_loss']:.4f} | "
            f"val ppl {m['val_ppl']:.2f} ({m['val_tokens']:,.0f} tokens)")


def samples_block(step: int, prompts: list[str], completions: list[str]) -> str:
    lines = [f"--- samples @ step {step} ---"]
    for prompt, completion in zip(prompts, completions):
        lines.append(f">>> {prompt!r}\n{prompt}{completion}\n")
    return "\n".join(lines)
