"""jaxgpt next to EleutherAI's lm-evaluation-harness itself, on one model and the same files.

    pip install lm_eval accelerate         # anywhere, e.g. a venv: pass its --lm_eval
    python bench/harness.py [--lm_eval=/venv/bin/lm_eval] [--examples=300]

One model (a small GPT-2 with random weights and the real GPT-2 BPE, or --model=DIR, a
`save_pretrained` GPT-2 with its tokenizer files) goes through the harness three ways:
its `hf` model (PyTorch, the reference), its `jaxgpt` model (`jaxgpt.harness`, the model
imported with convert.hf), and for HellaSwag/LAMBADA also `jaxgpt.tasks`. Tasks: the
harness's own `hellaswag`, `lambada_openai` and `wikitext` definitions (their YAML
included, only the data swapped for local files: log-likelihoods of choices, of last words,
rolling log-likelihoods of whole articles) and a greedy generation task. Offline: the files
are built from the shared Shakespeare and WikiText-2 text. Prints every metric side by side,
the largest log-likelihood differences, and how many generations are identical.
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
from jaxgpt import sources, tasks

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                      "shared", "data")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# task -> (the harness's task folder, its YAML, the split the local file stands for)
INCLUDED = {"hellaswag": ("hellaswag", "hellaswag", "validation"),
            "lambada": ("lambada", "lambada_openai", "test"),
            "wikitext": ("wikitext", "wikitext", "test")}


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
    some WikiHow-style [tags]), LAMBADA passages (WikiText-2 sentences), 12 WikiText-2
    articles (rolling log-likelihood) and 40 prompts (a line's first 6 words) to continue."""
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
    pages = [d.text for d in sources.wikitext_articles(text.splitlines(keepends=True), "wt2")]
    prompts = [{"prompt": " ".join(line.split()[:6]), "target": " ".join(line.split()[6:])}
               for line in rng.sample(lines, 40)]
    files = {}
    for task, rows in (("hellaswag", records), ("lambada", [{"text": s} for s in sentences[:n]]),
                       ("wikitext", [{"page": p} for p in pages[:12]]), ("generate", prompts)):
        files[task] = os.path.join(out, f"{task}.jsonl")
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


def task_yamls(python: str, files: dict[str, str], out: str) -> str:
    """A folder of task YAMLs: the harness's own hellaswag, lambada_openai and wikitext
    definitions (included) on the local files, and a greedy generation task."""
    task_dir = subprocess.run(
        [python, "-c", ("import lm_eval, os; print(os.path.join(os.path.dirname("
                        "lm_eval.__file__), 'tasks'))")],
        capture_output=True, text=True, check=True).stdout.strip()
    yaml_dir = os.path.join(out, "tasks")
    os.makedirs(yaml_dir, exist_ok=True)
    for task, (folder, name, split) in INCLUDED.items():
        with open(os.path.join(yaml_dir, f"{task}_local.yaml"), "w") as f:
            f.write(f"include: {os.path.join(task_dir, folder, name + '.yaml')}\n"
                    f"task: {task}_local\ndataset_path: json\ndataset_name: null\n"
                    f"training_split: null\nvalidation_split: null\ntest_split: null\n"
                    f"{split}_split: {split}\n"     # the local file holds this one split
                    f"dataset_kwargs:\n  data_files:\n    {split}: {files[task]}\n")
    with open(os.path.join(yaml_dir, "generate_local.yaml"), "w") as f:
        f.write(f"task: generate_local\ndataset_path: json\ndataset_name: null\n"
                f"test_split: test\ndataset_kwargs:\n  data_files:\n"
                f"    test: {files['generate']}\noutput_type: generate_until\n"
                f"doc_to_text: '{{{{prompt}}}}'\ndoc_to_target: '{{{{target}}}}'\n"
                f"generation_kwargs:\n  until: ['\\n', '.']\n  max_gen_toks: 24\n"
                f"  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
                f"metadata:\n  version: 1.0\n")
    return yaml_dir


def run_harness(lm_eval: str, model_flags: list[str], yaml_dir: str, out: str) -> dict:
    """{task: {"samples": [resps per doc], "metrics": {...}}} of one harness run."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    names = ",".join(f"{t}_local" for t in (*INCLUDED, "generate"))
    subprocess.run([*lm_eval.split(), *model_flags, "--tasks", names, "--include_path",
                    yaml_dir, "--device", "cpu", "--batch_size", "16", "--output_path", out,
                    "--log_samples"], env=env, check=True, cwd=REPO)
    got = {}
    with open(max(glob.glob(os.path.join(out, "*", "results_*.json")))) as f:
        for task, metrics in json.load(f)["results"].items():
            got[task.removesuffix("_local")] = {"metrics": {
                k.split(",")[0]: v for k, v in metrics.items()
                if isinstance(v, float) and "stderr" not in k}}
    for task, entry in got.items():
        with open(max(glob.glob(os.path.join(out, "*", f"samples_{task}_local_*")))) as f:
            samples = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
        entry["samples"] = [s["resps"] for s in samples]
    return got


def _lls(resps) -> np.ndarray:
    return np.array([float(r[0][0] if isinstance(r[0], list) else r[0]) for doc in resps
                     for r in doc])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm_eval", default="lm_eval", help="the harness's command")
    parser.add_argument("--python", help="the Python with lm_eval installed (default: the "
                                         "one beside --lm_eval, else this one)")
    parser.add_argument("--model", help="a GPT-2 save_pretrained directory with tokenizer "
                                        "files (default: a small random one)")
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--out", help="working directory (default: a temporary one)")
    args = parser.parse_args()
    beside = os.path.join(os.path.dirname(args.lm_eval), "python")
    python = args.python or (beside if os.path.exists(beside) else sys.executable)
    out = args.out or tempfile.mkdtemp(prefix="jaxgpt-harness-")
    model = args.model or random_gpt2(out)
    files = write_data(out, args.examples)
    print(f"{greedy_endings(files['lambada'], model)} LAMBADA passages end in the model's "
          f"greedy word")
    yaml_dir = task_yamls(python, files, out)
    hf = run_harness(args.lm_eval, ["--model", "hf", "--model_args",
                                    f"pretrained={model},dtype=float32"], yaml_dir,
                     os.path.join(out, "harness-hf"))
    adapter = run_harness(f"{python} -m jaxgpt.harness",
                          ["--model", "jaxgpt", "--model_args", f"run=hf:{model}"], yaml_dir,
                          os.path.join(out, "harness-jaxgpt"))
    lm = evaluation.load_lm(f"hf:{model}")
    print(f"\n{'task':10} {'metric':16} {'harness: hf':>16} {'harness: jaxgpt':>16} "
          f"{'jaxgpt.tasks':>16}")
    for task in (*INCLUDED, "generate"):
        mine = {}
        if task in tasks.READERS:
            examples = tasks.load(task, files[task])
            ours = tasks.score(lm, examples)
            mine = tasks.metrics(task, examples, ours)
            if "ppl" in mine:
                mine["perplexity"] = mine["ppl"]     # the harness's name for it
        for key, theirs in hf[task]["metrics"].items():
            print(f"{task:10} {key:16} {theirs:16.8g} {adapter[task]['metrics'][key]:16.8g} "
                  + (f"{mine[key]:16.8g}" if key in mine else f"{'':>16}"))
        if task == "generate":
            a, b = adapter[task]["samples"], hf[task]["samples"]
            print(f"{task:10} {sum(x == y for x, y in zip(a, b))}/{len(b)} generations "
                  f"identical to the hf model's")
            continue
        ref = _lls(hf[task]["samples"])
        pairs = [("harness: jaxgpt", _lls(adapter[task]["samples"]))]
        if task in tasks.READERS:
            pairs.append(("jaxgpt.tasks", np.array([ll for s in ours for ll, _ in s])))
        for name, lls in pairs:
            d = np.abs(lls - ref)
            print(f"{task:10} {name}: {len(ref)} log-likelihoods, max |diff| from hf "
                  f"{d.max():.2e} (relative {np.max(d / np.abs(ref)):.2e})")


if __name__ == "__main__":
    main()
