"""jaxgpt's HellaSwag/LAMBADA scoring next to EleutherAI's lm-evaluation-harness itself.

    pip install lm_eval accelerate         # anywhere, e.g. a venv: pass its --lm_eval
    python bench/harness.py [--lm_eval=/venv/bin/lm_eval] [--examples=300]

One model (a small GPT-2 with random weights and the real GPT-2 BPE, or --model=DIR, a
`save_pretrained` GPT-2 with its tokenizer files) and the same files go through the
harness's own `hellaswag` and `lambada_openai` task definitions (their YAML included, only
the data source swapped for local files) and through `jaxgpt.tasks` (the model imported
with convert.hf). Offline: the files are HellaSwag- and LAMBADA-format records built from
the shared Shakespeare and WikiText-2 text. Prints acc/acc_norm/ppl from both and the
largest per-choice log-likelihood difference.
"""

import argparse
import glob
import json
import os
import random
import re
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxgpt import eval as evaluation
from jaxgpt import tasks

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                      "shared", "data")
LOCAL = {"hellaswag": ("hellaswag", "validation"), "lambada": ("lambada_openai", "test")}


def random_gpt2(out: str) -> str:
    """A 2-layer GPT-2 with sharpened random weights and the GPT-2 BPE files, saved."""
    import torch
    import transformers
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_positions=256, n_embd=64, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    path = os.path.join(out, "model")
    model.save_pretrained(path)
    bpe = os.path.join(SHARED, "gpt2-bpe")
    transformers.GPT2TokenizerFast(vocab=os.path.join(bpe, "encoder.json"),
                                   merges=os.path.join(bpe, "vocab.bpe")).save_pretrained(path)
    return path


def write_data(out: str, n: int) -> dict[str, str]:
    """HellaSwag records (context: a line; endings: the next line's rest and three others;
    some WikiHow-style [tags]) and LAMBADA passages (WikiText-2 sentences)."""
    rng = random.Random(0)
    with open(os.path.join(SHARED, "tinyshakespeare", "input.txt"), encoding="utf-8") as f:
        lines = [s.strip() for s in f if len(s.split()) >= 6]
    records = []
    for i in range(n):
        j = rng.randrange(1, len(lines) - 1)
        ctx, nxt = lines[j], lines[j + 1].split()
        endings = [" ".join(nxt[3:])] + [" ".join(lines[rng.randrange(len(lines))].split()[3:])
                                         for _ in range(3)]
        label = rng.randrange(4)
        endings[0], endings[label] = endings[label], endings[0]
        if i % 7 == 0:
            ctx = f"[header] {ctx} [title] {lines[j - 1]}"
        if i % 11 == 0:
            endings = ["[step] " + e for e in endings]
        records.append({"ind": i, "activity_label": nxt[0].strip(",.:;!?") or "Play",
                        "ctx_a": ctx, "ctx_b": " ".join(nxt[:3]).lower(), "endings": endings,
                        "label": str(label)})
    with open(os.path.join(SHARED, "wikitext-2", "valid.txt"), encoding="utf-8") as f:
        text = f.read()
    sentences = [s.strip().rstrip(". ") for s in re.split(r"(?<=\.) ", text)
                 if 15 <= len(s.split()) <= 60 and "=" not in s]
    rng.shuffle(sentences)
    files = {"hellaswag": os.path.join(out, "hellaswag.jsonl"),
             "lambada": os.path.join(out, "lambada.jsonl")}
    for task, rows in (("hellaswag", records), ("lambada", [{"text": s} for s in sentences[:n]])):
        with open(files[task], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return files


def greedy_endings(path: str, model: str) -> int:
    """Give every other LAMBADA passage the model's own greedy next word as its last word
    (where that token is a whole word), so accuracy is not all zeros; returns how many."""
    import torch
    import transformers
    tok = transformers.GPT2TokenizerFast.from_pretrained(model)
    lm = transformers.GPT2LMHeadModel.from_pretrained(model).eval()
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    changed = 0
    for row in rows[::2]:
        context = row["text"].rpartition(" ")[0]
        with torch.no_grad():
            logits = lm(torch.tensor([tok(context)["input_ids"]])).logits[0, -1]
        word = tok.decode([int(logits.argmax())])
        if word.startswith(" ") and word[1:].isalpha():
            row["text"], changed = context + word, changed + 1
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return changed


def run_harness(lm_eval: str, model: str, files: dict[str, str], out: str) -> dict:
    """{task: [[(ll, greedy) per choice] per example]} and the harness's metrics."""
    python = os.path.join(os.path.dirname(lm_eval), "python")
    task_dir = subprocess.run(
        [python if os.path.exists(python) else sys.executable, "-c",
         "import lm_eval, os; print(os.path.join(os.path.dirname(lm_eval.__file__), 'tasks'))"],
        capture_output=True, text=True, check=True).stdout.strip()
    yaml_dir = os.path.join(out, "tasks")
    os.makedirs(yaml_dir, exist_ok=True)
    for task, (name, split) in LOCAL.items():
        sub = "lambada" if task == "lambada" else task
        with open(os.path.join(yaml_dir, f"{task}_local.yaml"), "w") as f:
            f.write(f"include: {os.path.join(task_dir, sub, name + '.yaml')}\n"
                    f"task: {task}_local\ndataset_path: json\ndataset_name: null\n"
                    f"training_split: null\n"     # the local files hold one split
                    f"dataset_kwargs:\n  data_files:\n    {split}: {files[task]}\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    subprocess.run([lm_eval, "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
                    "--tasks", "hellaswag_local,lambada_local", "--include_path", yaml_dir,
                    "--device", "cpu", "--batch_size", "16", "--output_path",
                    os.path.join(out, "harness"), "--log_samples"], env=env, check=True)
    scores, results = {}, {}
    for task in LOCAL:
        path = max(glob.glob(os.path.join(out, "harness", "*", f"samples_{task}_local_*")))
        with open(path) as f:
            samples = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
        scores[task] = [[(float(r[0][0]), r[0][1] in (True, "True")) for r in s["resps"]]
                        for s in samples]
    path = max(glob.glob(os.path.join(out, "harness", "*", "results_*.json")))
    with open(path) as f:
        for task, got in json.load(f)["results"].items():
            results[task.removesuffix("_local")] = {
                k.split(",")[0]: v for k, v in got.items() if k.split(",")[0] in
                ("acc", "acc_norm", "perplexity")}
    return {"scores": scores, "metrics": results}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm_eval", default="lm_eval", help="the harness's command")
    parser.add_argument("--model", help="a GPT-2 save_pretrained directory with tokenizer "
                                        "files (default: a small random one)")
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--out", help="working directory (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="jaxgpt-harness-")
    model = args.model or random_gpt2(out)
    files = write_data(out, args.examples)
    print(f"{greedy_endings(files['lambada'], model)} LAMBADA passages end in the model's "
          f"greedy word")
    harness = run_harness(args.lm_eval, model, files, out)
    lm = evaluation.load_lm(f"hf:{model}")
    print(f"\n{'task':10} {'metric':10} {'harness':>16} {'jaxgpt':>16}")
    for task, path in files.items():
        examples = tasks.load(task, path)
        ours = tasks.score(lm, examples)
        mine = tasks.metrics(task, examples, ours)
        mine["perplexity"] = mine.get("ppl")
        for key, theirs in harness["metrics"][task].items():
            print(f"{task:10} {key:10} {theirs:16.8g} {mine[key]:16.8g}")
        a = np.array([ll for s in ours for ll, _ in s])
        b = np.array([ll for s in harness["scores"][task] for ll, _ in s])
        same_greedy = [g for s in ours for _, g in s] == [g for s in harness["scores"][task]
                                                          for _, g in s]
        print(f"{task:10} per choice: {len(a)} log-likelihoods, max |diff| "
              f"{np.abs(a - b).max():.2e} (relative {np.max(np.abs(a - b) / np.abs(b)):.2e}); "
              f"greedy flags {'equal' if same_greedy else 'DIFFER'}")


if __name__ == "__main__":
    main()
