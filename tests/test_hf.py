"""HF GPT-2 interop against PyTorch + transformers: logits, hidden states, loss and gradients,
import/export round trips, strict errors, refusal of pickled code, compare CLI, init_from."""

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxgpt import checkpoint, compare, model, tokenizer, train
from jaxgpt.convert import hf
from tests import helpers

torch.set_default_dtype(torch.float32)
TINY = {"vocab_size": 97, "n_positions": 32, "n_embd": 48, "n_layer": 2, "n_head": 4}


def _hf_model(seed=0, **fields):
    """A transformers GPT-2 with random weights and no dropout (eval mode)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=None, eos_token_id=None, **fields)
    m = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():   # HF zero-inits biases and unit-inits LayerNorm; randomize all
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m


def _torch_forward(m, tokens, mask):
    with torch.no_grad():
        out = m(input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask * 1),
                position_ids=torch.as_tensor(compare.positions_of(mask)),
                output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def _jax_forward(cfg, params, tokens, mask):
    def forward(params, tokens, mask, positions):
        gpt = nnx.merge(_graphdef(cfg), params)
        logits, _, hidden = gpt(tokens, attention_mask=mask, positions=positions,
                                return_hidden=True)
        return logits, hidden

    with jax.default_matmul_precision("highest"):
        logits, hidden = jax.jit(forward)(params, tokens, mask, compare.positions_of(mask))
    return np.asarray(logits), [np.asarray(h) for h in hidden]


def _graphdef(cfg):
    return nnx.graphdef(nnx.eval_shape(lambda: model.GPT(cfg, rngs=nnx.Rngs(0))))


def _random_params(cfg, seed):
    """Random jaxgpt params drawn with numpy (jax's init takes seconds to compile)."""
    state = nnx.state(nnx.eval_shape(lambda: model.GPT(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    rng = np.random.default_rng(seed)
    nnx.replace_by_pure_dict(state, jax.tree.map(
        lambda x: jnp.asarray(rng.normal(0.0, 0.1, x.shape), jnp.float32),
        nnx.to_pure_dict(state)))
    return state


def _batches(vocab, T):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, vocab, (3, T))
    full = np.ones((3, T), bool)
    padded = np.ones((3, T), bool)
    padded[1, :T // 2] = False        # left-padded row
    padded[2, T - 3:] = False         # right-padded row
    return tokens, {"full": full, "padded": padded}


SHAPE_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
SHAPES = {   # name -> SHAPE_FIELDS; the sequence is kept short so each case takes seconds
    "tiny": (97, 32, 48, 2, 4),
    "odd_heads_3": (101, 40, 48, 2, 3),
    "odd_heads_5_head_dim_13": (89, 24, 65, 2, 5),
    "gpt2_width": (50257, 1024, 768, 2, 12),            # gpt2's real widths, 2 of 12 layers
    "gpt2_medium_width": (50257, 1024, 1024, 1, 16),    # gpt2-medium's, 1 of 24 layers
}


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_and_hidden_states_match_pytorch(shape):
    m = _hf_model(**dict(zip(SHAPE_FIELDS, SHAPES[shape], strict=True)))
    cfg, params = hf.import_gpt2(m)
    assert (cfg.n_embd, cfg.n_head, cfg.vocab_size) == (m.config.n_embd, m.config.n_head,
                                                        m.config.vocab_size)
    tokens, masks = _batches(cfg.vocab_size, 12)
    for kind, mask in masks.items():
        ref_logits, ref_hidden = _torch_forward(m, tokens, mask)
        logits, hidden = _jax_forward(cfg, params, tokens, mask)
        max_diff = np.abs(ref_logits - logits)[mask].max()
        print(f"\n{shape} {kind}: max |Δlogit| = {max_diff:.3e} "
              f"(logit scale {np.abs(ref_logits[mask]).max():.2f})")
        assert max_diff <= 1e-4, (shape, kind)
        assert len(hidden) == len(ref_hidden) == cfg.n_layer + 1
        for i, (a, b) in enumerate(zip(ref_hidden, hidden)):
            np.testing.assert_allclose(b[mask], a[mask], atol=1e-4, rtol=0,
                                       err_msg=f"{shape} {kind} hidden state {i}")


def test_loss_and_gradients_match_pytorch():
    m = _hf_model(**TINY)
    cfg, params = hf.import_gpt2(m)
    windows = np.random.default_rng(2).integers(0, cfg.vocab_size, (4, 17))
    logits = m(input_ids=torch.as_tensor(windows[:, :-1])).logits
    ref_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size),
                                                 torch.as_tensor(windows[:, 1:]).reshape(-1))
    ref_loss.backward()
    # Tied: lm_head.weight is wte.weight, so named_parameters lists (and sums) it once.
    ref_grads = hf.params_from_hf({name: p.grad.numpy() for name, p in m.named_parameters()},
                                  cfg)
    with jax.default_matmul_precision("highest"):
        graphdef = _graphdef(cfg)
        loss_fn = jax.jit(jax.value_and_grad(lambda p, w: train.loss_fn(p, graphdef, w)))
        loss, grads = loss_fn(params, jnp.asarray(windows))
    np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-5)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(ref_grads)):
        scale = np.abs(np.asarray(r)).max()
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=0, atol=1e-4 * scale,
                                   err_msg=jax.tree_util.keystr(path))


def test_imported_params_are_not_views_of_the_torch_model():
    """Training the torch model in place after an import leaves the jaxgpt params as they
    were (jax arrays are immutable; a zero-copy import would let torch change them)."""
    m = _hf_model(**TINY)
    _, params = hf.import_gpt2(m)
    before = [np.array(x) for x in jax.tree.leaves(params)]
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    for a, b in zip(before, jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_training_steps_match_pytorch_adamw_with_clipping_and_schedule():
    """Five jaxgpt train steps (2 micro-batches each, global-norm clipping, decay on >= 2-D
    weights, linear warm-up then cosine to the floor) against the same steps in PyTorch:
    torch.optim.AdamW with two parameter groups, clip_grad_norm_ and the schedule in closed
    form (GPT-2/nanoGPT practice). The losses and every final parameter must agree."""
    import math

    from jaxgpt import sharding
    m = _hf_model(**TINY)
    cfg, params = hf.import_gpt2(m)
    ocfg = train.OptimConfig(learning_rate=3e-3, min_lr_ratio=0.1, warmup_steps=2,
                             b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0)
    total, accum, steps = 8, 2, 5
    rng = np.random.default_rng(3)
    batches = rng.integers(0, cfg.vocab_size, (steps, accum, 2, 17))

    def lr(k):   # the rate of update k (0-based); cosine over total - warmup updates
        if k < ocfg.warmup_steps:
            return ocfg.learning_rate * k / ocfg.warmup_steps
        t = (k - ocfg.warmup_steps) / (total - ocfg.warmup_steps)
        floor = ocfg.learning_rate * ocfg.min_lr_ratio
        return floor + (ocfg.learning_rate - floor) * 0.5 * (1 + math.cos(math.pi * t))

    named = list(m.named_parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": ocfg.weight_decay},
         {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}],
        lr=ocfg.learning_rate, betas=(ocfg.b1, ocfg.b2), eps=ocfg.eps)
    ref_losses, clipped = [], 0
    m.train()
    for k in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr(k)
        opt.zero_grad()
        loss = 0.0
        for micro in batches[k]:
            x = torch.as_tensor(micro)
            logits = m(input_ids=x[:, :-1]).logits
            part = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size),
                                                     x[:, 1:].reshape(-1)) / accum
            part.backward()
            loss += part.item()
        clipped += float(torch.nn.utils.clip_grad_norm_(m.parameters(), ocfg.grad_clip)
                         ) > ocfg.grad_clip
        opt.step()
        ref_losses.append(loss)
    assert 0 < clipped < steps    # the clip both acts and stays out of the way in this run
    ref_params = hf.params_from_hf({n: p.detach().numpy() for n, p in named}, cfg)

    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    trainer = train.make_trainer(cfg, train.make_optimizer(ocfg, total), mesh,
                                 sharding.RULES["dp"], seed=0)
    initial = [np.array(x) for x in jax.tree.leaves(params)]   # the step donates its state
    state = trainer.init()
    state = state.replace(params=jax.device_put(params, trainer.state_shardings.params))
    losses = []
    with jax.default_matmul_precision("highest"):
        for k in range(steps):
            state, metrics = trainer.train_step(state, jnp.asarray(batches[k], jnp.int32))
            losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    # The steps move every parameter (the comparison below is not of unchanged params).
    for a, b in zip(jax.tree.leaves(state.params), initial, strict=True):
        assert np.abs(np.asarray(a) - b).max() > 1e-3
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state.params),
                            jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5,
                                   err_msg=jax.tree_util.keystr(path))


def test_import_export_from_pretrained_gives_identical_logits(tmp_path):
    m = _hf_model(**TINY)
    cfg, params = hf.import_gpt2(m)
    hf.export_gpt2(str(tmp_path / "out"), cfg, params)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "out")).eval()
    tokens = torch.as_tensor(np.random.default_rng(3).integers(0, 97, (2, 16)))
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(tokens).logits.numpy(), m(tokens).logits.numpy())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 97 and config["n_layer"] == 2


def test_export_then_import_gives_identical_params(tmp_path, tiny_cfg):
    params = _random_params(tiny_cfg, 7)
    hf.export_gpt2(str(tmp_path / "out"), tiny_cfg, params)
    cfg, back = hf.import_gpt2("hf:" + str(tmp_path / "out"))   # the hf: prefix also takes a dir
    assert cfg == tiny_cfg
    helpers.assert_trees_close(nnx.to_pure_dict(back), nnx.to_pure_dict(params), rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="not empty"):
        hf.export_gpt2(str(tmp_path / "out"), tiny_cfg, params)


def test_padded_vocab_exports_the_real_rows(tmp_path):
    cfg = model.GPTConfig(**(TINY | {"vocab_size": 128}))
    params = _random_params(cfg, 1)
    hf.export_gpt2(str(tmp_path / "out"), cfg, params, vocab_size=97)
    m = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "out")).eval()
    assert m.config.vocab_size == 97
    tokens, masks = _batches(97, 10)
    ref, _ = _torch_forward(m, tokens, masks["full"])
    ours, _ = _jax_forward(cfg, params, tokens, masks["full"])
    np.testing.assert_allclose(ours[..., :97], ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="vocab_size 200"):
        hf.export_gpt2(str(tmp_path / "bad"), cfg, params, vocab_size=200)
    assert not os.path.exists(tmp_path / "bad")


def _saved(m, directory):
    m.save_pretrained(str(directory))
    from safetensors.numpy import load_file
    return load_file(str(directory / "model.safetensors"))


def test_missing_or_misshaped_tensor_is_named(tmp_path):
    from safetensors.numpy import save_file
    tensors = _saved(_hf_model(**TINY), tmp_path)
    path = str(tmp_path / "model.safetensors")
    bias = tensors.pop("transformer.h.1.mlp.c_fc.bias")
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"missing \['h.1.mlp.c_fc.bias'\]"):
        hf.import_gpt2(str(tmp_path))
    tensors["transformer.h.1.mlp.c_fc.bias"] = bias[:-1]
    save_file(tensors, path)
    with pytest.raises(ValueError) as err:
        hf.import_gpt2(str(tmp_path))
    for part in (path, "transformer.h.1.mlp.c_fc.bias", "['h'][1]['mlp']['c_fc']['bias']",
                 "(191,)", "(192,)"):
        assert part in str(err.value)
    tensors["transformer.h.1.mlp.c_fc.bias"] = bias
    tensors["transformer.h.1.mlp.extra"] = bias
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"unexpected \['h.1.mlp.extra'\]"):
        hf.import_gpt2(str(tmp_path))


def test_unsupported_configs_and_untied_heads_are_refused(tmp_path):
    m = _hf_model(**TINY)
    for field, value in [("activation_function", "relu"),
                         ("scale_attn_by_inverse_layer_idx", True), ("n_inner", 100)]:
        config = m.config.to_dict() | {field: value}
        with pytest.raises(ValueError, match=field):
            hf.import_gpt2(m.state_dict(), config=config)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    state["lm_head.weight"] += 1
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        hf.import_gpt2(state, config=m.config.to_dict())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama'"):
        hf.import_gpt2(str(tmp_path))


def test_old_checkpoint_layout_with_mask_buffers(tmp_path):
    """OpenAI-era files: no `transformer.` prefix, causal-mask buffers beside the weights."""
    from safetensors.numpy import save_file
    m = _hf_model(**TINY)
    tensors = {k.removeprefix("transformer."): v for k, v in _saved(m, tmp_path).items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    _, params = hf.import_gpt2(str(tmp_path))
    _, expected = hf.import_gpt2(m)
    helpers.assert_trees_close(nnx.to_pure_dict(params), nnx.to_pure_dict(expected),
                               rtol=0, atol=0)


class _Payload:
    """Unpickling this runs open(marker, 'w'): code a weights file must never execute."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pytorch_bin_imports_and_code_payload_is_refused(tmp_path):
    m = _hf_model(**TINY)
    m.config.to_json_file(str(tmp_path / "config.json"))
    torch.save(m.state_dict(), tmp_path / "pytorch_model.bin")
    _, params = hf.import_gpt2(str(tmp_path))
    _, expected = hf.import_gpt2(m)
    helpers.assert_trees_close(nnx.to_pure_dict(params), nnx.to_pure_dict(expected),
                               rtol=0, atol=0)
    marker = tmp_path / "payload_ran"
    torch.save(dict(m.state_dict(), payload=_Payload(marker)), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin: refused"):
        hf.import_gpt2(str(tmp_path))
    assert not marker.exists()
    torch.load(tmp_path / "pytorch_model.bin", weights_only=False)   # the payload is live
    assert marker.exists()


def _make_run(workdir, cfg, params, tok_spec):
    """A jaxgpt run directory holding one checkpoint with `params` (as training writes it)."""
    tx = train.make_optimizer(train.OptimConfig(), 10)
    state = train.TrainState(step=jnp.array(1, jnp.int32), params=params,
                             opt_state=tx.init(params),
                             rng=jax.random.key_data(jax.random.key(0)))
    ckpts = checkpoint.Checkpoints(str(workdir), keep=1, async_save=False)
    ckpts.save(state, {}, {"config": {"model": dataclasses.asdict(cfg)}, "tokenizer": tok_spec})
    ckpts.close()


@pytest.mark.slow
def test_export_cli_of_a_gpt2_bpe_run_and_compare_cli(tmp_path, shared_data, capsys):
    bpe = tokenizer.load("gpt2", os.path.join(shared_data, "gpt2-bpe"))
    # The padded GPT-2 vocabulary and bf16 compute, as configs/wikitext.py trains.
    cfg = model.GPTConfig(**(TINY | {"vocab_size": 50304, "dtype": "bfloat16"}))
    params = _random_params(cfg, 3)
    run = tmp_path / "run"
    _make_run(run, cfg, params, {"kind": "gpt2", "path": bpe.path,
                                 "fingerprint": bpe.fingerprint})
    out = str(tmp_path / "hf")
    assert hf.main(["export", f"--workdir={run}", f"--out={out}"]) == 0
    m = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert m.config.vocab_size == 50257 and m.config.eos_token_id == 50256
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Exported models carry their tokenizer."
    assert hf_tok(text)["input_ids"] == bpe.encode(text)
    assert hf.main(["export", f"--workdir={run}", f"--out={out}"]) == 2   # never overwrites

    assert compare.main([f"--hf={out}", f"--checkpoint={run}", "--tolerance=1e-4",
                         "--seq_len=16", "--pad=3"]) == 0
    assert "h.1 + ln_f" in capsys.readouterr().out
    # A model whose second block's attention differs: compare fails and points at h.1.
    broken = nnx.to_pure_dict(params)
    broken["h"][1]["attn"]["c_attn"]["kernel"] *= 1.5
    hf.export_gpt2(str(tmp_path / "broken"), cfg, broken, vocab_size=50257)
    assert compare.main([f"--hf={tmp_path / 'broken'}", f"--checkpoint={run}",
                         "--tolerance=1e-4", "--seq_len=16"]) == 1
    report = capsys.readouterr().out
    rows = {line.split()[0]: float(line.split()[-1]) for line in report.splitlines()
            if line.startswith("  ")}
    assert rows["embeddings"] == 0 and rows["h.0"] < 1e-5 and rows["h.1"] > 1e-3
    assert "FAIL" in report


def test_export_without_a_known_vocab_size_is_refused(tmp_path, tiny_cfg):
    params = _random_params(tiny_cfg, 0)
    _make_run(tmp_path / "run", tiny_cfg, params,
              {"kind": "sentencepiece", "path": str(tmp_path / "gone.model"),
               "fingerprint": "spm:0"})
    with pytest.raises(ValueError, match="--vocab_size"):
        hf.export_checkpoint(str(tmp_path / "run"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    hf.export_checkpoint(str(tmp_path / "run"), str(tmp_path / "out"), vocab_size=90)
    assert transformers.GPT2Config.from_pretrained(str(tmp_path / "out")).vocab_size == 90


def test_init_from_checks_architecture_and_pads_vocab(tmp_path):
    m = _hf_model(**TINY)
    m.save_pretrained(str(tmp_path / "hf"))
    cfg = model.GPTConfig(**(TINY | {"vocab_size": 128}))
    fresh = _random_params(cfg, 5)
    params = nnx.to_pure_dict(hf.init_params(str(tmp_path / "hf"), cfg, fresh))
    _, imported = hf.import_gpt2(m)
    imported, fresh = nnx.to_pure_dict(imported), nnx.to_pure_dict(fresh)
    np.testing.assert_array_equal(params["wte"]["embedding"][:97], imported["wte"]["embedding"])
    np.testing.assert_array_equal(params["wte"]["embedding"][97:], fresh["wte"]["embedding"][97:])
    np.testing.assert_array_equal(params["h"][1]["attn"]["c_proj"]["kernel"],
                                  imported["h"][1]["attn"]["c_proj"]["kernel"])
    other = model.GPTConfig(**(TINY | {"n_layer": 3, "n_head": 6}))
    with pytest.raises(ValueError, match="n_layer: 2 vs 3; n_head: 4 vs 6"):
        hf.init_params(str(tmp_path / "hf"), other, fresh)


@pytest.mark.slow
def test_training_starts_from_init_from(tmp_path):
    corpus = helpers.small_corpus(tmp_path)
    config = helpers.tiny_run_config(corpus, train__steps=1, eval__every=0,
                                     sample__max_new_tokens=0, data__tokenizer="gpt2")
    config.data.tokenizer_path = helpers.byte_level_bpe(tmp_path / "bpe")   # GPT-2's ids
    m = _hf_model(**{f: config.model[f] for f in hf.ARCH_FIELDS})
    m.save_pretrained(str(tmp_path / "hf"))
    config.init_from = str(tmp_path / "hf")
    # Step 1 runs at the warm-up's learning rate of 0, so the params stay the imported ones.
    out = train.train_and_evaluate(config, str(tmp_path / "run"))
    _, expected = hf.import_gpt2(m)
    helpers.assert_trees_close(nnx.to_pure_dict(out["state"].params),
                               nnx.to_pure_dict(expected), rtol=0, atol=0)


def test_hub_names_go_through_transformers_cache(tmp_path, monkeypatch):
    """Offline stand-in for the hub: transformers' cached_file resolves into a local dir."""
    m = _hf_model(**TINY)
    m.save_pretrained(str(tmp_path / "snapshot"))
    asked = []

    def cached_file(repo, filename, **kwargs):
        asked.append((repo, filename))
        return str(tmp_path / "snapshot" / filename)

    monkeypatch.setattr(transformers.utils, "cached_file", cached_file)
    _, params = hf.import_gpt2("hf:gpt2")
    assert ("gpt2", "model.safetensors") in asked and ("gpt2", "config.json") in asked
    _, expected = hf.import_gpt2(m)
    helpers.assert_trees_close(nnx.to_pure_dict(params), nnx.to_pure_dict(expected),
                               rtol=0, atol=0)
    asked.clear()      # a path that does not exist is named, not looked up on the hub
    for path in (str(tmp_path / "absent"), "./absent", "runs/x/absent"):
        with pytest.raises(FileNotFoundError, match=f"{re.escape(path)}: no such directory"):
            hf.import_gpt2("hf:" + path)
    assert asked == []


def test_jaxgpt_imports_without_torch_or_transformers():
    import subprocess
    import sys
    code = ("import sys; sys.modules.update(torch=None, transformers=None, safetensors=None, "
            "tokenizers=None); import jaxgpt.convert.hf, jaxgpt.compare, jaxgpt.train")
    out = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline HF cache of our own: `add(repo, save)` fills repo's snapshot via save(dir)."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"

    def add(repo, save):
        base = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
        (base / "snapshots" / commit).mkdir(parents=True)
        (base / "refs").mkdir()
        (base / "refs" / "main").write_text(commit)
        save(base / "snapshots" / commit)
        return sorted(os.listdir(base / "snapshots" / commit))
    return add


def test_hub_names_of_every_weight_layout_load_offline(hub_cache):
    """Single safetensors, sharded safetensors and a lone pytorch_model.bin, all cached."""
    m = _hf_model(**TINY)

    def bin_only(d):
        m.config.to_json_file(str(d / "config.json"))
        torch.save(m.state_dict(), d / "pytorch_model.bin")

    layouts = {"me/single": lambda d: m.save_pretrained(str(d)),
               "me/sharded": lambda d: m.save_pretrained(str(d), max_shard_size="100KB"),
               "me/bin-only": bin_only}
    files = {repo: hub_cache(repo, save) for repo, save in layouts.items()}
    assert "model.safetensors.index.json" in files["me/sharded"]
    assert files["me/bin-only"] == ["config.json", "pytorch_model.bin"]
    tokens, masks = _batches(97, 12)
    for repo in layouts:
        ref, _ = _torch_forward(transformers.GPT2LMHeadModel.from_pretrained(repo).eval(),
                                tokens, masks["full"])
        cfg, params = hf.import_gpt2("hf:" + repo)
        ours, _ = _jax_forward(cfg, params, tokens, masks["full"])
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0, err_msg=repo)
    hub_cache("me/no-weights", lambda d: m.config.to_json_file(str(d / "config.json")))
    with pytest.raises(FileNotFoundError, match="me/no-weights has no weights") as err:
        hf.import_gpt2("hf:me/no-weights")
    assert "model.safetensors.index.json" in str(err.value)


def test_export_directory_mode_follows_umask(tmp_path, tiny_cfg):
    """As `os.makedirs` would make it (save_pretrained's too); an existing one keeps its own."""
    import stat
    params = _random_params(tiny_cfg, 0)
    old = os.umask(0o027)
    try:
        os.makedirs(tmp_path / "reference")
        hf.export_gpt2(str(tmp_path / "new"), tiny_cfg, params)
    finally:
        os.umask(old)
    (tmp_path / "existing").mkdir()
    os.chmod(tmp_path / "existing", 0o751)
    hf.export_gpt2(str(tmp_path / "existing"), tiny_cfg, params)

    def mode(name):
        return stat.S_IMODE(os.stat(tmp_path / name).st_mode)
    assert mode("reference") & 0o777 == 0o750
    assert mode("new") == mode("reference")
    assert mode("existing") == 0o751


@pytest.mark.parametrize("vocab_size", ["0", "-5"])
def test_export_cli_refuses_a_vocab_size_below_one(tmp_path, tiny_cfg, capsys, vocab_size):
    _make_run(tmp_path / "run", tiny_cfg, _random_params(tiny_cfg, 0),
              {"kind": "sentencepiece", "path": str(tmp_path / "gone.model"),
               "fingerprint": "spm:0"})
    assert hf.main(["export", f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'out'}",
                    f"--vocab_size={vocab_size}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: vocab_size {vocab_size} must be in [1, ")
    assert not os.path.exists(tmp_path / "out")


def test_exported_tokenizer_truncates_to_the_context(tmp_path, shared_data):
    bpe = tokenizer.load("gpt2", os.path.join(shared_data, "gpt2-bpe"))
    cfg = model.GPTConfig(**(TINY | {"vocab_size": bpe.vocab_size}))
    out = str(tmp_path / "hf")
    hf.export_gpt2(out, cfg, _random_params(cfg, 0), tokenizer=bpe)
    n_positions = transformers.GPT2Config.from_pretrained(out).n_positions
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_tok("word " * 100, truncation=True, return_tensors="pt")["input_ids"]
    assert n_positions == 32 and ids.shape == (1, n_positions)
    with torch.no_grad():   # the model accepts what its tokenizer gives it
        transformers.GPT2LMHeadModel.from_pretrained(out)(ids)


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_truncated_weights_file_is_named(tmp_path, filename, capsys):
    from jaxgpt import sample_cli
    m = _hf_model(**TINY)
    m.config.to_json_file(str(tmp_path / "config.json"))
    path = tmp_path / filename
    if filename == "pytorch_model.bin":
        torch.save(m.state_dict(), path)
    else:
        m.save_pretrained(str(tmp_path))
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: not a readable .* truncated"):
        hf.import_gpt2(str(tmp_path))
    capsys.readouterr()   # save_pretrained's progress bar
    assert sample_cli.main([f"--hf={tmp_path}", "--prompt=Hi"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: not a readable")
