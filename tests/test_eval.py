"""Evaluation: perplexity vs numpy, sliding windows vs brute force, per-source weighting,
generation metrics and cloze scoring vs hand-computed values."""

import functools
import json
import math
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from jaxgpt import eval as evaluation
from jaxgpt import model, train


def _numpy_logp(logits):
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def tiny_lm():
    cfg = model.GPTConfig(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4)
    params = nnx.state(model.GPT(cfg, rngs=nnx.Rngs(params=jax.random.key(1))), nnx.Param)
    graphdef = nnx.graphdef(model.GPT(cfg, rngs=nnx.Rngs(0)))
    logits_fn = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])

    def last_logits(prefixes):
        """The plain model's logits after each prefix [P, V]. Prefixes are right-padded to
        n_positions: causal attention keeps padding out of earlier positions."""
        x = np.zeros((len(prefixes), cfg.n_positions), np.int32)
        for i, p in enumerate(prefixes):
            x[i, :len(p)] = p
        logits = np.asarray(logits_fn(params, x))
        return logits[np.arange(len(prefixes)), [len(p) - 1 for p in prefixes]]

    return cfg, params, graphdef, last_logits


def test_perplexity_is_exp_of_numpy_mean_nll(tiny_lm):
    cfg, params, graphdef, last_logits = tiny_lm
    windows = np.random.default_rng(0).integers(0, 97, size=(12, 17)).astype(np.int32)
    prefixes = [list(w[:t]) for w in windows for t in range(1, 17)]
    targets = [int(w[t]) for w in windows for t in range(1, 17)]
    logp = _numpy_logp(last_logits(prefixes))
    nll = -logp[np.arange(len(targets)), targets]
    expect = math.exp(np.mean(nll))
    step_fn = jax.jit(functools.partial(train.eval_step, graphdef=graphdef))
    got = evaluation.evaluate_windows(functools.partial(step_fn, params), windows, batch=4)
    np.testing.assert_allclose(got["val_ppl"], expect, rtol=1e-5)
    assert got["val_tokens"] == 12 * 16
    # The standalone path (padded, bucketed log-probs) gives the same per-token numbers.
    lps = evaluation.target_logprobs(cfg, params, [list(w) for w in windows], batch_size=5)
    np.testing.assert_allclose(-np.concatenate(lps), nll, rtol=1e-4, atol=1e-5)
    for bad in (97, -1):     # ids JAX would clamp are refused, naming the row
        with pytest.raises(ValueError, match=f"row 1 has token id {bad} outside"):
            evaluation.target_logprobs(cfg, params, [[1, 2], [3, bad, 4]])


@pytest.mark.parametrize("context,stride", [(16, 16), (16, 5), (32, 32)])
def test_sliding_window_equals_brute_force(tiny_lm, context, stride):
    cfg, params, _, last_logits = tiny_lm
    ids = [int(i) for i in np.random.default_rng(1).integers(0, 97, size=50)]
    got = evaluation.stream_nll(functools.partial(evaluation.target_logprobs, cfg, params),
                                ids, context=context, stride=stride)
    # Brute force from the protocol's definition: window k reads ids[k * stride:end_k] with
    # end_k = min(k * stride + context, N - 1) and predicts ids up to end_k; token t is
    # scored by the first window that predicts it, with exactly ids[k * stride:t] as context.
    prefixes = []
    for t in range(1, len(ids)):
        k = next(k for k in range(len(ids)) if min(k * stride + context, len(ids) - 1) >= t)
        prefixes.append(ids[k * stride:t])
        if k > 0:
            assert len(prefixes[-1]) >= context - stride + 1
    logp = _numpy_logp(last_logits(prefixes))
    expect = -logp[np.arange(len(ids) - 1), ids[1:]]
    assert got.shape == (len(ids) - 1,)
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-5)


def test_sliding_window_rejects_bad_stride():
    with pytest.raises(ValueError, match="stride must be in \\[1, context=8\\], got 9"):
        evaluation.sliding_windows(100, 8, 9)


def test_per_source_perplexities_weight_average_to_the_global_one(tiny_lm):
    _, params, graphdef, _ = tiny_lm
    rng = np.random.default_rng(2)
    windows = rng.integers(0, 97, size=(20, 9)).astype(np.int32)
    source_ids = np.array([0] * 8 + [1] * 4 + [2] * 8)
    by_source = evaluation.group_by_source(windows, source_ids, ["Book", "Wiki", "Code"])
    assert {k: len(v) for k, v in by_source.items()} == {"Book": 8, "Wiki": 4, "Code": 8}
    step_fn = functools.partial(jax.jit(functools.partial(train.eval_step, graphdef=graphdef)),
                                params)
    got = evaluation.evaluate_windows(step_fn, by_source, batch=4)
    names = ("Book", "Wiki", "Code")
    tokens = np.array([got[f"val_tokens/{n}"] for n in names])
    log_ppl = np.array([math.log(got[f"val_ppl/{n}"]) for n in names])
    np.testing.assert_allclose(math.log(got["val_ppl"]), (tokens * log_ppl).sum() / tokens.sum(),
                               rtol=1e-10)
    assert got["val_tokens"] == tokens.sum() == 20 * 8
    # All sources together equal the unsplit windows scored as one source.
    whole = evaluation.evaluate_windows(step_fn, np.concatenate(list(by_source.values())),
                                        batch=4)
    np.testing.assert_allclose(whole["val_loss"], got["val_loss"], rtol=1e-6)


def test_a_source_smaller_than_a_batch_is_scored_and_none_at_all_is_an_error(tiny_lm):
    _, params, graphdef, _ = tiny_lm
    step_fn = functools.partial(jax.jit(functools.partial(train.eval_step, graphdef=graphdef)),
                                params)
    w = np.random.default_rng(4).integers(0, 97, (5, 9)).astype(np.int32)
    got = evaluation.evaluate_windows(step_fn, {"big": w[:4], "tiny": w[4:]}, batch=4)
    assert got["val_tokens/big"] == 4 * 8 and got["val_tokens/tiny"] == 8
    alone = evaluation.evaluate_windows(step_fn, w[4:], batch=1)    # a batch of its own
    np.testing.assert_allclose(got["val_loss/tiny"], alone["val_loss"], rtol=1e-6)
    with pytest.raises(ValueError, match="no validation windows to evaluate"):
        evaluation.evaluate_windows(step_fn, w[:0], batch=4)


# A bigram "model" with fixed logits over the vocabulary {0: end-of-text, 1: a, 2: b, 3: c}.
BIGRAM = np.array([[0.0, 1.0, 2.0, 0.5],
                   [1.0, 0.0, 3.0, 1.0],
                   [0.5, 2.0, 0.0, 1.5],
                   [2.0, 1.0, 1.0, 0.0]])
LOGP = _numpy_logp(BIGRAM)


def _bigram_logprobs(rows):
    return [LOGP[np.asarray(r[:-1]), np.asarray(r[1:])] for r in rows]


class _Chars:
    eot_id = 0
    vocab_size = 4

    def encode(self, text):
        return [" abc".index(ch) for ch in text]


def test_coherence_and_pmi_match_hand_computed_values():
    lp = lambda prev, nxt: LOGP[" abc".index(prev), " abc".index(nxt)]
    eot = " "
    scores = evaluation.continuation_scores(_bigram_logprobs, _Chars(), ["ab", "c"],
                                            ["ca", "b"], limit=32)
    # prompt "ab" + "ca": cond log p(c|b) + log p(a|c); uncond log p(c|eot) + log p(a|c)
    # prompt "c" + "b":   cond log p(b|c);               uncond log p(b|eot)
    cond = lp("b", "c") + lp("c", "a") + lp("c", "b")
    uncond = lp(eot, "c") + lp("c", "a") + lp(eot, "b")
    got = evaluation.coherence_pmi(scores)
    np.testing.assert_allclose(got["coherence_ppl"], math.exp(-cond / 3), rtol=1e-12)
    np.testing.assert_allclose(got["pmi"], (cond - uncond) / 3, rtol=1e-12)
    assert got["scored_tokens"] == 3


def test_continuation_scores_cut_the_prompt_from_the_left_and_skip_empty_ones():
    scores = evaluation.continuation_scores(_bigram_logprobs, _Chars(), ["abcab", "a"],
                                            ["cc", ""], limit=4)
    # "abcab" + "cc" does not fit 4 ids: the prompt keeps its last 2 ("ab").
    np.testing.assert_allclose(scores[0][0], [LOGP[2, 3], LOGP[3, 3]])
    np.testing.assert_allclose(scores[0][1], [LOGP[0, 3], LOGP[3, 3]])
    assert scores[1][0].size == scores[1][1].size == 0


def test_distinct_n_and_repeated_ngrams_match_hand_counts():
    seqs = [[1, 2, 1, 2], [1, 2, 3]]
    assert evaluation.distinct_n(seqs, 1) == 3 / 7
    assert evaluation.distinct_n(seqs, 2) == 3 / 5     # 12 21 12 | 12 23
    assert evaluation.distinct_n(seqs, 3) == 3 / 3     # 121 212 | 123
    # 1234 2341 3412 4123 1234 2341: the last two are repeats; [5, 6, 7] has no 4-gram.
    assert evaluation.repeated_ngram_rate([[1, 2, 3, 4, 1, 2, 3, 4, 1], [5, 6, 7]], 4) == 2 / 6
    assert math.isnan(evaluation.distinct_n([[1]], 2))


def test_cloze_ranks_match_hand_computed_log_likelihoods():
    facts = [{"prompt": "a", "answer": "b", "candidates": ["c", "b", "aa"]},
             {"prompt": "ca", "answer": "cc", "candidates": ["cc", "b"]}]
    # Fact 1 after "a": c: 1.0, b: 3.0, aa: 0.0 + 0.0 (logits, one softmax row) -> b first.
    # Fact 2 after "a": cc = log p(c|a) + log p(c|c); b = log p(b|a).
    cc, b = LOGP[1, 3] + LOGP[3, 3], LOGP[1, 2]
    assert b > cc
    assert evaluation.cloze_ranks(_bigram_logprobs, _Chars(), facts) == [1, 2]


def test_prompt_suite_and_cloze_set_ship_with_the_package():
    suite = evaluation.load_prompt_file(evaluation.SUITE)
    kinds = {p["kind"] for p in suite["prompts"]}
    assert kinds == {"narrative", "factual", "technical", "dialogue"}
    assert len(suite["prompts"]) >= 20
    assert any(p["text"] == "In the year 2100, artificial intelligence had evolved to become"
               for p in suite["prompts"])
    assert len({p["id"] for p in suite["prompts"]}) == len(suite["prompts"])
    facts = evaluation.load_prompt_file(evaluation.CLOZE)["facts"]
    assert len(facts) >= 20 and all(f["answer"] in f["candidates"] for f in facts)


def test_slimpajama_sources_are_read_by_set_name(shared_data):
    sources = evaluation.read_sources(f"{shared_data}/slimpajama-sample/validation")
    assert set(sources) == {"RedPajamaBook", "RedPajamaWikipedia"}
    assert all(isinstance(d, str) and d for docs in sources.values() for d in docs)


def test_plain_text_is_one_document_and_a_bad_record_names_its_line(shared_data, tmp_path,
                                                                   capsys):
    path = pathlib.Path(shared_data, "wikitext-2", "valid.txt")
    assert evaluation.read_sources(str(path)) == {"text": [path.read_text(encoding="utf-8")]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(ValueError, match=f"{bad}:2: malformed JSON"):
        evaluation.read_sources(str(bad))
    # The command line reads its --data before it loads any model, and names the flag.
    assert evaluation.main([f"--checkpoint={tmp_path / 'no-run'}", f"--data={bad}"]) == 2
    assert evaluation.main([f"--checkpoint={tmp_path / 'no-run'}",
                            f"--data={tmp_path / 'absent.txt'}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"error: {bad}:2: malformed JSON (Expecting value: column 10)")
    assert err[1] == f"error: --data '{tmp_path / 'absent.txt'}' does not exist"


# --- The command line: bad flags and paths are one-line errors found before any scoring -------

class _CharTok:
    """A character tokenizer over the tiny vocabulary (end-of-text is 0)."""
    eot_id, vocab_size = 0, 97

    def encode_batch(self, texts):
        return [[ord(c) % 96 + 1 for c in t] for t in texts]


@pytest.fixture
def fake_cli(tiny_lm, tmp_path, monkeypatch, capsys):
    """main(*flags) on a tiny in-memory model: (exit code, stderr lines, models loaded)."""
    cfg, params, _, _ = tiny_lm
    loaded = []

    def load_lm(spec):
        loaded.append(spec)
        return evaluation.LM(spec, cfg, params, _CharTok())
    monkeypatch.setattr(evaluation, "load_lm", load_lm)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 3)

    def run(*flags, data=str(text)):
        code = evaluation.main(["--checkpoint=run", f"--data={data}", *flags])
        return code, capsys.readouterr().err.splitlines(), loaded
    return run


def test_cli_defaults_and_explicit_windows_are_used_and_written(fake_cli, tmp_path):
    out = tmp_path / "e.json"
    assert fake_cli(f"--out={out}")[0] == 0
    got = json.loads(out.read_text())
    assert (got["context"], got["stride"], got["tokens"]) == (32, 16, 3 * 45 - 1)
    assert fake_cli("--context=8", "--stride=8", f"--out={out}")[0] == 0
    got = json.loads(out.read_text())
    assert (got["context"], got["stride"]) == (8, 8)


def test_cli_checks_out_before_scoring(fake_cli, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    cases = {tmp_path / "missing" / "e.json": f"folder '{tmp_path / 'missing'}' does not exist",
             tmp_path: "is a folder; name a file in it",
             a_file / "e.json": f"'{a_file}' is not a folder"}
    for out, why in cases.items():
        code, err, loaded = fake_cli(f"--out={out}")
        assert code == 2 and len(err) == 1 and not loaded, (out, err)
        assert err[0].startswith(f"error: --out '{out}'") and why in err[0]


@pytest.mark.parametrize("flag,message", [
    ("--batch_size=0", "--batch_size must be >= 1, got 0"),
    ("--stride=0", "--stride must be >= 1, got 0"),
    ("--context=0", "--context must be >= 1, got 0"),
    ("--context=-5", "--context must be >= 1, got -5"),
    ("--stride=-3", "--stride must be >= 1, got -3")])
def test_cli_rejects_non_positive_numbers_naming_the_flag(fake_cli, flag, message):
    code, err, loaded = fake_cli(flag)
    assert (code, err, loaded) == (2, [f"error: {message}"], [])


def test_cli_windows_must_fit_the_model(fake_cli):
    assert fake_cli("--context=64")[1] == [
        "error: --context=64 exceeds the model's n_positions 32"]
    assert fake_cli("--stride=40")[1] == [
        "error: --stride=40 exceeds the context 32 (--context, default the model's n_positions)"]
    assert fake_cli("--context=8", "--stride=9")[0] == 2
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        evaluation.target_logprobs(None, None, [[1, 2]], batch_size=0)


def test_cli_names_the_data_that_has_nothing_to_predict(fake_cli, tmp_path):
    for name, text in (("empty.txt", ""), ("one.txt", "x")):
        path = tmp_path / name
        path.write_text(text)
        code, err, _ = fake_cli(data=str(path))
        want = (f"error: --data '{path}': source 'text' has {len(text)} token(s), nothing to "
                f"predict (scoring needs at least 2)")
        assert (code, err) == (2, [want])
    empty = tmp_path / "empty.jsonl"      # the reader itself names an empty .jsonl
    empty.write_text("")
    assert fake_cli(data=str(empty))[1] == [f"error: {empty}: holds no documents"]


# --- Model specs, context fitting of report rows, strict JSON, padded vocabularies ----------


def test_a_directory_named_like_run_at_step_is_that_directory(tmp_path, monkeypatch):
    """`runs/exp@10` that exists is that directory (even beside a run `runs/exp` with a step
    10); only a spec that is no directory has its trailing @DIGITS split off."""
    loaded = []

    def load_params(workdir, step=None):
        loaded.append((workdir, step))
        raise LookupError("stop here")
    monkeypatch.setattr(evaluation.checkpoint, "load_params", load_params)
    for name in ("exp", "exp@10", "lr@3e-4"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
    for spec, want in ((f"{tmp_path}/exp@10", (f"{tmp_path}/exp@10", None)),
                       (f"{tmp_path}/lr@3e-4", (f"{tmp_path}/lr@3e-4", None)),
                       (f"{tmp_path}/exp@7", (f"{tmp_path}/exp", 7)),
                       (f"{tmp_path}/exp", (f"{tmp_path}/exp", None))):
        with pytest.raises(LookupError):
            evaluation.load_lm(spec)
        assert loaded.pop() == want, spec
    # No such directory and no step to split off: named as a missing run, not a bad step.
    with pytest.raises(FileNotFoundError, match="exp@v2'?: no such run directory"):
        evaluation.load_lm(f"{tmp_path}/exp@v2")
    with pytest.raises(ValueError, match="names no HF model"):
        evaluation.load_lm("hf:")


def test_report_continuations_keep_half_the_context_for_the_prompt():
    # Prompt "abcabc" (6 ids) + continuation "ccaab" (5) into 6: the prompt keeps its last
    # 6 // 2 = 3 ids ("abc"), the continuation its first 3 ("cca"); 2 of 5 are not scored.
    scores = evaluation.continuation_scores(_bigram_logprobs, _Chars(), ["abcabc"], ["ccaab"],
                                            limit=6)
    cond, uncond = scores[0]
    np.testing.assert_allclose(cond, [LOGP[3, 3], LOGP[3, 3], LOGP[3, 1]], rtol=1e-12)
    np.testing.assert_allclose(uncond, [LOGP[0, 3], LOGP[3, 3], LOGP[3, 1]], rtol=1e-12)
    # The rule itself on ids: a short prompt keeps all of itself; a short continuation is whole.
    assert evaluation.fit_keeping_prompt([1, 2], [3] * 9, 6) == ([1, 2], [3] * 4)
    assert evaluation.fit_keeping_prompt([1] * 9, [3, 3], 6) == ([1] * 4, [3, 3])
    assert evaluation.fit_keeping_prompt([1] * 9, [3] * 9, 7) == ([1] * 3, [3] * 4)
    # tasks.encode's rule (prompt first, the choice never cut) is unchanged.
    assert evaluation.fit([1] * 9, [3, 3], 6) == ([1] * 4, [3, 3])
    # The report row says how many were scored of how many, and marks the cut.
    scorer = type("Scorer", (), {"logprobs": staticmethod(_bigram_logprobs), "tok": _Chars(),
                                 "cfg": model.GPTConfig(vocab_size=4, n_positions=6)})()
    got = evaluation.generation_metrics(scorer, ["abcabc", "a"], ["ccaab", "bc"])
    assert (got["scored_tokens"], got["continuation_tokens"]) == (3 + 2, 5 + 2)
    from jaxgpt import report
    assert report.scored_cell(got) == "5/7 (cut)"
    assert report.scored_cell({"scored_tokens": 7, "continuation_tokens": 7}) == "7/7"


def test_cloze_rows_fit_the_context_and_a_fact_that_cannot_is_skipped(caplog):
    facts = [{"prompt": "abcabca", "answer": "b", "candidates": ["c", "b", "aa"]},
             {"prompt": "cbca", "answer": "cc", "candidates": ["cc", "b"]},
             {"prompt": "ab", "answer": "cccc", "candidates": ["cccc", "a"]}]
    rows_seen = []

    def logprobs(rows):
        rows_seen.extend(rows)
        return _bigram_logprobs(rows)
    with caplog.at_level("WARNING", logger="jaxgpt.eval"):
        ranks = evaluation.cloze_ranks(logprobs, _Chars(), facts, limit=4, name="tiny")
    # Fact 1 after "a": b (logit 3.0) beats c (1.0) and aa (0 + 0): rank 1. Fact 2 after "a":
    # cc = log p(c|a) + log p(c|c) is below b = log p(b|a): rank 2. Fact 3's "cccc" needs 4
    # ids plus one of prompt, more than 4: skipped, and the warning names it.
    assert LOGP[1, 2] > LOGP[1, 3] + LOGP[3, 3]
    assert ranks == [1, 2]
    assert max(len(r) for r in rows_seen) <= 4
    # Every candidate of a fact reads the same prompt ids: the last 4 - 2 of "abcabca".
    assert rows_seen[:3] == [[3, 1, 3], [3, 1, 2], [3, 1, 1, 1]]
    assert "cloze fact 2 ('ab' -> 'cccc') skipped for tiny" in caplog.text


def test_json_outputs_write_nan_as_null(tmp_path, capsys):
    out = tmp_path / "r.json"
    result = {"acc": 1.0, "acc_stderr": math.nan, "ppl": [math.inf, 2.5], "n": 1}
    assert evaluation.run_cli(lambda: result, str, str(out)) == 0
    capsys.readouterr()

    def strict(name):
        raise ValueError(f"bare {name} in the JSON")
    assert json.loads(out.read_text(), parse_constant=strict) == {
        "acc": 1.0, "acc_stderr": None, "ppl": [None, 2.5], "n": 1}


def test_a_padded_vocabulary_scores_as_pytorch_scores_its_export(shared_data, tmp_path):
    """A model with vocab_size 50304 and the GPT-2 tokenizer's 50257 ids, its padding rows
    made loud (they would take most of the probability and every argmax): perplexity, greedy
    hits, and the trainer's eval_step / logprob_step equal PyTorch on the HF export, which
    has only the tokenizer's rows."""
    import os

    import optax
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxgpt import sharding, tokenizer
    from jaxgpt.convert import hf
    tok = tokenizer.load("gpt2", os.path.join(shared_data, "gpt2-bpe"))
    assert tok.vocab_size == 50257
    cfg = model.GPTConfig(vocab_size=50304, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    # Random weights drawn in numpy (an eager nnx init of this vocabulary takes seconds).
    params = nnx.state(nnx.eval_shape(lambda: model.GPT(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    rng = np.random.default_rng(0)
    nnx.replace_by_pure_dict(params, jax.tree_util.tree_map_with_path(
        lambda path, x: jax.numpy.asarray(
            float("scale" in jax.tree_util.keystr(path))      # LayerNorm scales near 1
            + 0.1 * rng.standard_normal(x.shape, np.float32)), nnx.to_pure_dict(params)))
    pure = nnx.to_pure_dict(params)
    wte = np.array(pure["wte"]["embedding"])
    wte[50257:] = rng.normal(size=(47, 32))     # std 1: the padding rows dominate every logit
    pure["wte"]["embedding"] = jax.numpy.asarray(wte)
    nnx.replace_by_pure_dict(params, pure)
    export = hf.export_gpt2(str(tmp_path / "hf"), cfg, params, vocab_size=50257)
    pt = transformers.GPT2LMHeadModel.from_pretrained(export).eval()

    text = "The quick brown fox jumps over the lazy dog, and the cat sat on the mat."
    ids = tok.encode(text)
    assert 8 < len(ids) <= 33
    with torch.no_grad():
        logits = pt(torch.tensor([ids[:-1]])).logits[0].double()
    ref_lp = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), ids[1:]].numpy()
    greedy = ids[:1]     # PyTorch's greedy text: every target is its argmax
    with torch.no_grad():
        for _ in range(16):
            greedy.append(int(pt(torch.tensor([greedy])).logits[0, -1].argmax()))

    lm = evaluation.LM("padded", cfg, params, tok)
    got = evaluation.perplexity_of_sources(lm, {"text": [text]}, context=32, stride=32)
    np.testing.assert_allclose(got["loss"], -ref_lp.mean(), rtol=1e-5)
    np.testing.assert_allclose(got["ppl"], math.exp(-ref_lp.mean()), rtol=1e-5)
    (lp, hits), = evaluation.target_logprobs(cfg, params, [greedy], greedy=True,
                                            n_valid_vocab=lm.n_valid_vocab)
    assert hits.all()    # over all 50304 ids, every argmax would be a padding id

    # The trainer: eval_step (the fused tied head) and logprob_step, given n_valid_vocab.
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    trainer = train.make_trainer(cfg, optax.sgd(0.1), mesh, sharding.RULES["dp"], seed=0,
                                 n_valid_vocab=tok.vocab_size)
    windows = np.array([ids[:17], ids[-17:]], np.int32)
    val = train.evaluate(trainer, params, windows, batch=2, max_batches=0)
    with torch.no_grad():
        ref = torch.log_softmax(pt(torch.tensor(windows[:, :-1])).logits.double(), -1)
    ref_nll = -ref.gather(-1, torch.tensor(windows[:, 1:, None], dtype=torch.long)).mean()
    np.testing.assert_allclose(val["val_loss"], float(ref_nll), rtol=1e-5)
    rows = np.zeros((2, 33), np.int32)
    rows[:, :len(greedy)] = greedy
    lp_t, hits_t = trainer.logprob_step(params, train.to_global(rows, mesh, ("batch", None),
                                                                trainer.rules))
    np.testing.assert_allclose(np.asarray(lp_t)[0, :len(greedy) - 1], lp, rtol=1e-5, atol=1e-6)
    assert np.asarray(hits_t)[:, :len(greedy) - 1].all()
