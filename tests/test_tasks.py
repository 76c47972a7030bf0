"""HellaSwag and LAMBADA scoring (jaxgpt/tasks.py) against PyTorch GPT-2: the harness's
text clean-up written out by hand, log-likelihoods and greedy hits from transformers, the
context/continuation split of the joined text as the harness tokenizes it."""

import dataclasses
import json
import logging
import math
import os
import pathlib
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxgpt import eval as evaluation
from jaxgpt import harness, report, tasks, tokenizer, train
from jaxgpt.convert import hf
from tests import helpers

HELLASWAG = [
    {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
     "ctx_b": "he", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"activity_label": "Home and Garden", "ctx_a": "[header] How to plant tulips "
     "[title] Choose a sunny spot.", "ctx_b": "", "label": 0,
     "endings": ["[step] Tulips need at least six hours of sun a day.",
                 "Paint the fence  blue.", "[title] Eat the bulbs.", "Wait for snow."]},
    {"activity_label": "Baking cookies", "ctx_a": "A woman mixes flour and butter in a bowl.",
     "ctx_b": "she", "label": 1,
     "endings": ["throws the bowl at the wall.", "scoops the dough onto a tray.",
                 "reads a newspaper.", "drives to the airport."]},
    {"activity_label": "Cooking", "ctx_a": "How to cook rice. Rinse the rice. [step]",
     "ctx_b": "", "label": 2,
     "endings": ["Paint it.", "Fold it twice.", "Put it in a pot of water.", "Sing."]},
]
# The same records after the harness's rules, written out by hand: query
# "label: ctx_a Ctx_b", stripped, " [title]" -> ". ", other [tags] dropped, then double
# spaces single.
QUERIES = ["Roof shingle removal: A man is sitting on a roof. He",
           "Home and Garden: How to plant tulips. Choose a sunny spot.",
           "Baking cookies: A woman mixes flour and butter in a bowl. She",
           "Cooking: How to cook rice. Rinse the rice. "]    # a tag at the end leaves a space
ENDINGS = [HELLASWAG[0]["endings"],
           [" Tulips need at least six hours of sun a day.", "Paint the fence blue.",
            " Eat the bulbs.", "Wait for snow."],     # a tag at the start leaves its space
           HELLASWAG[2]["endings"], HELLASWAG[3]["endings"]]
LAMBADA = ["She opened the door and the cat ran straight into the kitchen",
           "The train was late again, so Maria decided to walk to the station",
           "After years of practice he finally played the whole sonata on the piano",
           "He waved from the platform and said  goodbye"]   # two spaces before the word


def test_hellaswag_records_are_cleaned_as_the_harness_does(tmp_path):
    path = tmp_path / "hs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG))
    examples = tasks.read_hellaswag(str(path))
    for ex, query, endings, record in zip(examples, QUERIES, ENDINGS, HELLASWAG):
        assert ex.context == query
        assert ex.choices == tuple(" " + e for e in endings)
        assert ex.label == record["label"]


def test_bad_records_are_named_by_file_and_line(tmp_path):
    path = tmp_path / "hs.jsonl"
    good = json.dumps(HELLASWAG[0])
    for bad, why in ((json.dumps({**HELLASWAG[0], "label": 4}), "label 4"),
                     ('{"ctx_a": "x"}', "not a HellaSwag record"), ("{oops", "not JSON")):
        path.write_text(good + "\n" + bad + "\n")
        with pytest.raises(ValueError, match=f"hs.jsonl:2: {why}"):
            tasks.read_hellaswag(str(path))
    path.write_text(json.dumps({"text": "oneword"}) + "\n")
    with pytest.raises(ValueError, match="hs.jsonl:1: a LAMBADA record"):
        tasks.read_lambada(str(path))


@pytest.fixture(scope="module")
def gpt2_pair(shared_data, tmp_path_factory):
    """(jaxgpt LM, PyTorch model, HF tokenizer): one random GPT-2 with the real BPE."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    m = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5 * torch.randn_like(p))    # sharper predictions than HF's init
    out = tmp_path_factory.mktemp("gpt2")
    m.save_pretrained(str(out))
    bpe = os.path.join(shared_data, "gpt2-bpe")
    cfg, params = hf.import_gpt2(str(out))
    lm = evaluation.LM("hf:tiny", cfg, params, tokenizer.load("gpt2", bpe))
    ref_tok = transformers.GPT2TokenizerFast(vocab=os.path.join(bpe, "encoder.json"),
                                             merges=os.path.join(bpe, "vocab.bpe"))
    return lm, m, ref_tok


def _reference(m, ref_tok, context, continuation):
    """The harness's split: trailing spaces of the context join the continuation, then
    encode(context + continuation) minus encode(context)."""
    while context.endswith(" "):
        context, continuation = context[:-1], " " + continuation
    whole = ref_tok(context + continuation)["input_ids"]
    n_ctx = len(ref_tok(context)["input_ids"])
    with torch.no_grad():
        logits = m(torch.tensor([whole[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    targets = torch.tensor(whole[n_ctx:])
    rows = torch.arange(n_ctx - 1, len(whole) - 1)
    ll = float(logp[rows, targets].sum())
    greedy = bool((logits[rows].argmax(-1) == targets).all())
    return ll, greedy


def test_hellaswag_scores_match_pytorch(gpt2_pair, tmp_path):
    lm, m, ref_tok = gpt2_pair
    path = tmp_path / "hs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG))
    examples = tasks.read_hellaswag(str(path))
    got = tasks.score(lm, examples, batch_size=4)
    ref = [[_reference(m, ref_tok, q, " " + e)[0] for e in ends]
           for q, ends in zip(QUERIES, ENDINGS)]
    np.testing.assert_allclose([[ll for ll, _ in s] for s in got], ref, rtol=2e-5, atol=2e-4)
    result = tasks.metrics("hellaswag", examples, got)
    acc = np.mean([np.argmax(r) == rec["label"] for r, rec in zip(ref, HELLASWAG)])
    acc_norm = np.mean([np.argmax(np.asarray(r) / [len(e) for e in ends]) == rec["label"]
                        for r, ends, rec in zip(ref, ENDINGS, HELLASWAG)])
    assert (result["acc"], result["acc_norm"]) == (acc, acc_norm)
    assert result["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / 3))   # n - 1


def test_lambada_scores_and_greedy_hits_match_pytorch(gpt2_pair, tmp_path):
    lm, m, ref_tok = gpt2_pair
    # Also each passage with its last word replaced by the model's greedy next token when
    # that is a word, so acc is not 0 for want of hits.
    texts = list(LAMBADA)
    for text in LAMBADA:
        context = text.rsplit(" ", 1)[0]
        with torch.no_grad():
            best = int(m(torch.tensor([ref_tok(context)["input_ids"]])).logits[0, -1].argmax())
        piece = ref_tok.convert_ids_to_tokens(best)
        if piece.startswith("Ġ") and piece[1:].isalpha():
            texts.append(f"{context} {piece[1:]}")
    assert len(texts) > len(LAMBADA)
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    examples = tasks.read_lambada(str(path))
    got = tasks.score(lm, examples)
    ref = [_reference(m, ref_tok, t.rsplit(" ", 1)[0], " " + t.rsplit(" ", 1)[1]) for t in texts]
    np.testing.assert_allclose([s[0][0] for s in got], [r[0] for r in ref], rtol=2e-5,
                               atol=2e-4)
    assert [s[0][1] for s in got] == [r[1] for r in ref]
    result = tasks.metrics("lambada", examples, got)
    assert result["acc"] == np.mean([r[1] for r in ref]) > 0
    assert result["ppl"] == pytest.approx(math.exp(-np.mean([r[0] for r in ref])), rel=1e-5)


def test_cli_prints_a_row_per_model_and_refuses_a_missing_file(gpt2_pair, tmp_path,
                                                                  monkeypatch, capsys):
    lm, _, _ = gpt2_pair
    monkeypatch.setattr(evaluation, "load_lm", lambda spec: dataclasses.replace(lm, name=spec))
    path = tmp_path / "hs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG))
    out = tmp_path / "r.json"
    assert tasks.main(["--task=hellaswag", "--models=a,b", f"--data={path}", "--limit=2",
                       f"--out={out}"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["model", "step", "examples", "acc", "acc_norm"]
    assert [row.split()[0] for row in table[2:]] == ["a", "b"]
    saved = json.loads(out.read_text())
    assert [r["examples"] for r in saved["results"]] == [2, 2]
    assert tasks.main(["--task=lambada", "--models=a", f"--data={tmp_path / 'none'}"]) == 2
    assert "error:" in capsys.readouterr().err


def test_metrics_from_hand_computed_scores():
    ex = tasks.Example("q", (" ab", " abcde"), 1, "f:1")
    # acc takes the higher sum (-4 > -9); acc_norm the higher per character of the ending
    # without its leading space: -4/2 = -2 < -9/5 = -1.8.
    result = tasks.metrics("hellaswag", [ex, ex], [[(-4.0, False), (-9.0, False)]] * 2)
    assert (result["acc"], result["acc_norm"], result["acc_stderr"]) == (0.0, 1.0, 0.0)
    word = tasks.Example("passage", (" word",), 0, "f:1")
    result = tasks.metrics("lambada", [word] * 4, [[(-1.0, True)], [(-3.0, False)],
                                                   [(-2.0, True)], [(-2.0, True)]])
    assert result["acc"] == 0.75 and result["acc_stderr"] == pytest.approx(
        math.sqrt(0.75 * 0.25 / 3))                            # sample variance: n - 1
    assert result["ppl"] == pytest.approx(math.exp(2.0))


def test_fetch_downloads_once_and_names_the_url_when_it_cannot(tmp_path, monkeypatch):
    src = tmp_path / "lambada_test.jsonl"
    src.write_text(json.dumps({"text": "two words"}) + "\n")
    monkeypatch.setitem(tasks.URLS, "lambada", src.as_uri())
    cache = tmp_path / "cache"
    path = tasks.fetch("lambada", str(cache))
    assert pathlib.Path(path).read_text() == src.read_text()
    src.unlink()
    assert tasks.fetch("lambada", str(cache)) == path          # cached: no second download
    monkeypatch.setitem(tasks.URLS, "hellaswag", (tmp_path / "gone.jsonl").as_uri())
    with pytest.raises(OSError, match="gone.jsonl .*give the file instead"):
        tasks.fetch("hellaswag", str(cache))
    assert sorted(os.listdir(cache)) == ["lambada_test.jsonl"]


def test_scoring_in_chunks_logs_progress_and_changes_nothing(gpt2_pair, tmp_path, monkeypatch,
                                                              caplog):
    lm, _, _ = gpt2_pair
    path = tmp_path / "hs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG))
    examples = tasks.read_hellaswag(str(path))
    whole = tasks.score(lm, examples)
    monkeypatch.setattr(tasks, "PROGRESS_ROWS", 3)
    with caplog.at_level(logging.INFO):
        chunked = tasks.score(lm, examples)
    # Other batches pad to other lengths: at most the last bits may differ.
    np.testing.assert_allclose([[ll for ll, _ in s] for s in chunked],
                               [[ll for ll, _ in s] for s in whole], rtol=1e-6)
    assert [[g for _, g in s] for s in chunked] == [[g for _, g in s] for s in whole]
    assert "hf:tiny: 15/16 rows scored" in caplog.text and "ETA" in caplog.text


def _task_files(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    hs, lb = tmp_path / "hs.jsonl", tmp_path / "lb.jsonl"
    hs.write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG))
    lb.write_text("".join(json.dumps({"text": t}) + "\n" for t in LAMBADA))
    return hs, lb


def test_a_run_scores_its_tasks_at_every_eval_as_the_cli_scores_its_checkpoint(tmp_path):
    """eval.tasks: params sharded over 8 devices (FSDP) give the scores that the final
    checkpoint gets on one device through `tasks.score`."""
    hs, lb = _task_files(tmp_path)
    config = helpers.tiny_run_config(helpers.small_corpus(tmp_path),
                                     eval__tasks=f"hellaswag={hs},lambada={lb}",
                                     mesh__shape=(1, -1, 1), mesh__rules="fsdp")
    run = str(tmp_path / "run")
    train.train_and_evaluate(config, run)
    _, evals = report.read_metrics(run)
    assert [e["step"] for e in evals] == [3, 6]
    lm = evaluation.load_lm(run)
    assert lm.step == 6
    for task, path in (("hellaswag", hs), ("lambada", lb)):
        examples = tasks.load(task, str(path))
        want = tasks.metrics(task, examples, tasks.score(lm, examples, batch_size=3))
        for key in tasks.TRAINING_KEYS[task]:
            assert evals[-1][f"{task}/{key}"] == pytest.approx(want[key], rel=1e-5), key
    line = report.eval_line(evals[-1])
    assert (f"hellaswag acc {evals[-1]['hellaswag/acc']:.4f} "
            f"acc_norm {evals[-1]['hellaswag/acc_norm']:.4f}") in line
    assert f"lambada acc {evals[-1]['lambada/acc']:.4f} ppl " in line
    rows = dict(report.status_rows(*report.read_metrics(run)))
    assert rows["hellaswag"].endswith("@ step 6")
    assert "benchmarks" in report.make_plots(*report.read_metrics(run))


def test_eval_tasks_are_checked_before_the_workdir_is_touched(tmp_path):
    hs, _ = _task_files(tmp_path)
    corpus = helpers.small_corpus(tmp_path)
    run = tmp_path / "run"
    for tasks_spec, changes, error in (
            ("hellaswag=/no/such.jsonl", {}, "the hellaswag file '/no/such.jsonl' does not"),
            ("hellaswog", {}, "eval.tasks: unknown task 'hellaswog'"),
            (f"hellaswag={hs}", {"eval__every": 0}, "eval.every is 0"),
            (f"hellaswag={hs}", {"eval__tasks_limit": -1}, "eval.tasks_limit must be >= 0")):
        config = helpers.tiny_run_config(corpus, eval__tasks=tasks_spec, **changes)
        with pytest.raises((ValueError, FileNotFoundError), match=error):
            train.train_and_evaluate(config, str(run))
        assert not run.exists()


# ---- jaxgpt.harness: the lm-evaluation-harness model interface (without lm_eval) ----


def _requests(*args):
    return [types.SimpleNamespace(args=a) for a in args]


def test_rolling_windows_are_the_harness_documented_ones():
    # lm_eval's LM.loglikelihood_rolling docstring: tokens 0..9, prefix BOS, max length 4 ->
    # inputs [BOS 0 1 2] [3 4 5 6] [5 6 7 8] predicting [0 1 2 3] [4 5 6 7] [8 9].
    windows = harness.rolling_windows(range(10), -1, 4)
    inputs = [(ctx + targets)[-5:-1] for ctx, targets in windows]
    assert inputs == [[-1, 0, 1, 2], [3, 4, 5, 6], [5, 6, 7, 8]]
    assert [t for _, t in windows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert harness.rolling_windows([7, 8], -1, 4) == [([-1], [7, 8])]
    assert harness.rolling_windows([], -1, 4) == []


def test_harness_adapter_scores_match_pytorch(gpt2_pair):
    lm, m, ref_tok = gpt2_pair
    adapter = harness.Adapter(lm, batch_size=4)
    pairs = [("The cat sat on the", " mat"), ("", "Hello world"), ("Say it ", "again"),
             (QUERIES[0], " " + ENDINGS[0][3])]
    got = adapter.loglikelihood(_requests(*pairs))
    ref = [_reference(m, ref_tok, c or "<|endoftext|>", x) for c, x in pairs]
    np.testing.assert_allclose([g[0] for g in got], [r[0] for r in ref], rtol=2e-5, atol=2e-4)
    assert [g[1] for g in got] == [r[1] for r in ref]
    # Rolling: the whole text after end-of-text, in windows of n_positions (64) tokens; a
    # text of ~150 tokens takes three.
    text = " ".join(LAMBADA * 3)
    ids = ref_tok(text)["input_ids"]
    assert len(ids) > 2 * lm.cfg.n_positions
    want = 0.0
    for ctx, targets in harness.rolling_windows(ids, ref_tok.eos_token_id, lm.cfg.n_positions):
        row = ctx + targets
        with torch.no_grad():
            logp = torch.log_softmax(m(torch.tensor([row[:-1]])).logits[0].double(), -1)
        want += float(logp[torch.arange(len(row) - 1), torch.tensor(row[1:])][-len(targets):]
                      .sum())
    short = LAMBADA[0]
    with torch.no_grad():
        ids_short = [ref_tok.eos_token_id] + ref_tok(short)["input_ids"]
        logp = torch.log_softmax(m(torch.tensor([ids_short[:-1]])).logits[0].double(), -1)
    want_short = float(logp[torch.arange(len(ids_short) - 1), torch.tensor(ids_short[1:])].sum())
    got = adapter.loglikelihood_rolling(_requests((text,), (short,), ("",)))
    np.testing.assert_allclose(got, [want, want_short, 0.0], rtol=2e-5)


def test_harness_adapter_generates_as_hf_greedy_and_cuts_at_stop_strings(gpt2_pair):
    lm, m, ref_tok = gpt2_pair
    prompts = ["The history of the Roman Empire", "Once upon a time", "def main():"]
    want = []
    for p in prompts:
        ids = ref_tok(p)["input_ids"]
        with torch.no_grad():
            out = m.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                             pad_token_id=ref_tok.eos_token_id)
        want.append(ref_tok.decode(out[0, len(ids):].tolist()))
    got = harness.Adapter(lm, batch_size=2).generate_until(
        _requests(*((p, {"until": [], "max_gen_toks": 12}) for p in prompts)))
    assert got == want
    stop = want[0][len(want[0]) // 2]       # a character from the middle of the first one
    cut = harness.Adapter(lm).generate_until(
        _requests((prompts[0], {"until": stop, "max_gen_toks": 12, "do_sample": False})))
    assert cut == [want[0].split(stop)[0]] and len(cut[0]) < len(want[0])
    # As HF: sampling only with do_sample, and temperature 0 is greedy even then.
    greedy = harness.Adapter(lm).generate_until(_requests(
        (prompts[1], {"until": [], "max_gen_toks": 12, "temperature": 0.9}),
        (prompts[1], {"until": [], "max_gen_toks": 12, "do_sample": True, "temperature": 0})))
    assert greedy == [want[1], want[1]]


def test_in_training_scores_record_how_many_examples_they_are_over(tmp_path):
    """DuringTraining logs TASK/examples beside each task's scores, and the status row
    shows it, so a report can tell these scores from the Benchmarks table's."""
    import jax
    from flax import nnx

    from jaxgpt import model

    class Chars:
        eot_id, vocab_size = 0, 97

        def encode(self, text):
            return [ord(c) % 96 + 1 for c in text]
    cfg = model.GPTConfig(vocab_size=97, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    params = nnx.state(model.GPT(cfg, rngs=nnx.Rngs(params=jax.random.key(0))), nnx.Param)
    graphdef = nnx.graphdef(model.GPT(cfg, rngs=nnx.Rngs(0)))
    step = jax.jit(lambda tokens: evaluation.target_logprobs_step(
        params, tokens, graphdef=graphdef, greedy=True))
    hs, lb = _task_files(tmp_path)
    loaded = [("hellaswag", str(hs), tasks.load("hellaswag", str(hs), 3)),
              ("lambada", str(lb), tasks.load("lambada", str(lb)))]
    got = tasks.DuringTraining(loaded, Chars(), cfg.n_positions, 4)(cfg, params, step)
    assert (got["hellaswag/examples"], got["lambada/examples"]) == (3, len(LAMBADA))
    rows = dict(report.status_rows(
        [{"step": 6, "total_steps": 6, "loss": 1.0, "lr": 0.0, "tokens_per_s": 1.0,
          "samples_per_s": 1.0, "epoch": 0.1}],
        [{"step": 6, "val_loss": 1.0, "val_ppl": 2.7, "val_tokens": 8.0, **got}]))
    assert rows["hellaswag"] == (f"acc {got['hellaswag/acc']:.4f} acc_norm "
                                 f"{got['hellaswag/acc_norm']:.4f} on 3 examples @ step 6")
    assert rows["lambada"].endswith(f"on {len(LAMBADA)} examples @ step 6")
