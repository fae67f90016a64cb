"""LoRA (model.lora) against the real PEFT package (peft 0.21.2 on transformers + torch).

One LoRA language-model run on the tiny HF model (1 CPU device in a subprocess, adapter
dropout on) serves as the reference of the kill-and-resume test and as the source of the
exports: its PEFT adapter loads in `PeftModel.from_pretrained` with every adapter key used
and equal logits, and its merged export in transformers equals PEFT's adapter applied. A
sequence classifier (bfloat16 compute; LayerNorms and biases training too) exports the same
way; an adapter that peft itself made (random B) imports with equal logits; 8 sharded
devices equal one (with scan over layers and remat); bad settings exit 2.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_checkpoint import (  # noqa: F401 (autouse fixture)
    Trainer,
    private_data_cache,
    resumed_from,
    write_text,
)
from test_train import write_csv

from gpt2jax.hf import to_flat_params
from gpt2jax.run import load_model

TARGETS = ["c_attn", "c_proj", "c_fc"]  # c_proj: both projections, as PEFT matches it
IDS = np.random.default_rng(5).integers(0, 50000, (2, 12))  # no EOS (the pad token)


def lora_config(tmp: Path, base: Path, steps: int) -> Path:
    cfg = {
        "model": {"init": str(base), "dropout": 0.0,
                  "lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "targets": TARGETS}},
        "data": {"train": str(write_text(tmp / "text.txt", n_docs=12, words=40)),
                 "task": "lm"},
        "optim": {"lr": 1e-2, "warmup_steps": 1},
        "train": {"steps": steps, "batch_size": 8, "seq_len": 16, "log_every": 1,
                  "eval_every": 0, "checkpoint_every": 2, "progress": "lines", "seed": 2},
    }
    path = tmp / "lora.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, hf_lm_dir):
    """The reference LoRA run (6 steps) and the same run killed after step 5, resumed."""
    tmp = tmp_path_factory.mktemp("lora")
    base, _ = hf_lm_dir
    cfg = lora_config(tmp, base, steps=6)
    trainer = Trainer(tmp)
    code, _, err = trainer.run(cfg, f"--train.run_dir={tmp / 'ref'}")
    assert code == 0, err
    code, _, err = trainer.run(cfg, f"--train.run_dir={tmp / 'run'}", fault="kill@step:5")
    assert code == -signal.SIGKILL, err
    code, _, err = trainer.run(cfg, f"--train.run_dir={tmp / 'run'}")
    assert code == 0, err
    return {"tmp": tmp, "base": base, "ref": tmp / "ref", "run": tmp / "run",
            "resumed_from": resumed_from(err)}


@pytest.fixture(scope="module")
def base_model(hf_lm_dir):
    """The tiny HF model as a gpt2jax model (loaded once: every load costs seconds)."""
    return load_model(str(hf_lm_dir[0]))[0]


def _flat(run: Path) -> dict:
    return to_flat_params(load_model(str(run), dtype="float32")[0])


def test_killed_lora_run_resumes_bit_identical(runs):
    assert runs["resumed_from"] >= 2
    ref, got = _flat(runs["ref"]), _flat(runs["run"])
    assert ref.keys() == got.keys()
    for name in ref:
        assert np.array_equal(ref[name], got[name]), name


def test_base_stays_bit_identical_and_only_adapters_change(runs, base_model):
    trained = _flat(runs["ref"])
    base = to_flat_params(base_model)
    adapters = {k for k in trained if "_lora_" in k}
    # every target in both layers: c_attn, both c_proj, c_fc, an A and a B each
    assert len(adapters) == 2 * 4 * 2 and set(trained) - adapters == set(base)
    for name, value in base.items():
        assert np.array_equal(trained[name], value), name
    for name in adapters:
        if name.endswith("_lora_b"):  # zero at the start
            assert np.abs(trained[name]).min() > 0, name


def test_optimizer_state_holds_only_the_adapters(runs):
    """The run's optimizer state (as the train step builds it): Adam's mu and nu for the
    adapters and nothing for the frozen base."""
    import jax

    from gpt2jax.config import read_run_config
    from gpt2jax.params import flat
    from gpt2jax.sharding import make_mesh
    from gpt2jax.train import build_step

    cfg = read_run_config(runs["ref"])
    model = load_model(str(runs["ref"]))[0]
    plan = build_step(cfg, model.cfg, make_mesh(devices=jax.devices()[:1]), 6)
    state = {k: v for k, v in flat(plan.abstract_opt).items() if v.size > 1}
    assert state and all("_lora_" in k and (".mu." in k or ".nu." in k) for k in state), state
    # by hand: 2 layers x rank 4 x (in + out) of c_attn (32+96), attn.c_proj (32+32),
    # c_fc (32+128), mlp.c_proj (128+32)
    n = 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert sum(v.size for k, v in to_flat_params(model).items() if "_lora_" in k) == n
    assert sum(v.size for v in state.values()) == 2 * n


def _peft(base_model, adapter: Path):
    """PEFT's model with the adapter; asserts every adapter tensor in the file was used
    and none was missing."""
    from peft import PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    model = PeftModel.from_pretrained(base_model, str(adapter)).eval()
    res = set_peft_model_state_dict(model, load_peft_weights(str(adapter)))
    assert not res.unexpected_keys, res.unexpected_keys
    missing = [k for k in res.missing_keys if "lora_" in k or "modules_to_save.default" in k]
    assert not missing, missing
    return model


def _torch_logits(model, ids=IDS) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def test_lm_adapter_loads_in_peft_with_equal_logits_and_merges(runs, cli):
    from transformers import GPT2LMHeadModel

    tmp = runs["tmp"]
    for flag, out in (("--adapter", tmp / "adapter"), (None, tmp / "merged")):
        res = cli("export", "--model", runs["ref"], "--out", out, *([flag] if flag else []))
        assert res.code == 0, res.err
    conf = yaml.safe_load((tmp / "adapter" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["fan_in_fan_out"] is True
    peft_model = _peft(GPT2LMHeadModel.from_pretrained(str(runs["base"])), tmp / "adapter")
    ours = np.asarray(load_model(str(runs["ref"]), dtype="float32")[0](IDS))
    theirs = _torch_logits(peft_model)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    merged = _torch_logits(GPT2LMHeadModel.from_pretrained(str(tmp / "merged")).eval())
    np.testing.assert_allclose(merged, theirs, rtol=0, atol=1e-5)
    base = _torch_logits(GPT2LMHeadModel.from_pretrained(str(runs["base"])).eval())
    assert np.abs(base - theirs).max() > 1e-3  # the adapters do something


# ---------------------------------------------------------------- sequence classification


def test_sequence_adapter_with_layer_norms_and_biases_loads_in_peft(hf_lm_dir, base_model,
                                                                   tmp_path, cli):
    from transformers import GPT2ForSequenceClassification

    base, _ = hf_lm_dir
    cfg = {"model": {"init": str(base), "head": "sequence", "dropout": 0.0, "dtype": "bfloat16",
                     "lora": {"rank": 2, "targets": ["c_attn", "mlp.c_proj"],
                              "train": ["layer_norm", "bias"]}},
           "data": {"train": str(write_csv(tmp_path / "train.csv", 24, 0)),
                    "task": "classification", "validation_fraction": 0.0},
           "optim": {"lr": 1e-2},
           "train": {"steps": 2, "batch_size": 8, "seq_len": 16, "eval_every": 0,
                     "run_dir": str(tmp_path / "run"), "progress": "none"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    res = cli("train", tmp_path / "cfg.yaml")
    assert res.code == 0, res.err
    res = cli("export", "--model", tmp_path / "run", "--out", tmp_path / "ad", "--adapter")
    assert res.code == 0, res.err
    conf = yaml.safe_load((tmp_path / "ad" / "adapter_config.json").read_text())
    assert conf["task_type"] == "SEQ_CLS" and conf["bias"] == "all"
    assert conf["modules_to_save"] == ["ln_1", "ln_2", "ln_f", "score"]
    model = load_model(str(tmp_path / "run"), dtype="float32")[0]
    hf_base = GPT2ForSequenceClassification.from_pretrained(
        str(base), num_labels=model.cfg.num_labels, pad_token_id=50256)
    theirs = _torch_logits(_peft(hf_base, tmp_path / "ad"))
    np.testing.assert_allclose(np.asarray(model(IDS)), theirs, rtol=0, atol=1e-5)
    trained, start = to_flat_params(model), to_flat_params(base_model)
    assert not np.array_equal(trained["h.0.ln_1.scale"], start["h.0.ln_1.scale"])
    assert not np.array_equal(trained["h.1.mlp.c_fc_bias"], start["h.1.mlp.c_fc_bias"])
    assert np.array_equal(trained["h.1.mlp.c_fc_kernel"], start["h.1.mlp.c_fc_kernel"])


# ---------------------------------------------------------------- import


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory, hf_lm_dir):
    """An adapter made by peft itself with random A and B (init_lora_weights=False)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    base, _ = hf_lm_dir
    out = tmp_path_factory.mktemp("peft") / "adapter"
    torch.manual_seed(3)
    conf = LoraConfig(r=4, lora_alpha=12, target_modules=["c_attn", "c_proj"],
                      fan_in_fan_out=True, init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(str(base)), conf).eval()
    model.save_pretrained(str(out))
    return out, _torch_logits(model)


def _lora_model_config(source):
    """The base's config with peft_adapter's LoRA settings."""
    from gpt2jax.config import LoraSection
    from gpt2jax.run import lora_fields

    lora = LoraSection(rank=4, alpha=12.0, targets=["c_attn", "c_proj"])
    return source.cfg.replace(**lora_fields(lora))


def test_peft_made_adapter_imports_with_equal_logits(peft_adapter, base_model):
    """run.initial_params, as `gpt2jax train` calls it with model.lora.adapter (per-layer
    layout; scan_layers' stacking of the same values is the LM run's)."""
    import jax
    from flax import nnx

    from gpt2jax.model import abstract_model
    from gpt2jax.run import initial_params
    from gpt2jax.sharding import make_mesh, state_shardings

    adapter, theirs = peft_adapter
    mcfg = _lora_model_config(base_model)
    graphdef, abstract = nnx.split(abstract_model(mcfg))
    sh = state_shardings(abstract, make_mesh(devices=jax.devices()[:1]))
    model = nnx.merge(graphdef, initial_params(mcfg, 0, base_model, sh, str(adapter)))
    np.testing.assert_allclose(np.asarray(model(IDS)), theirs, rtol=0, atol=1e-5)
    # decoding folds the adapters into the kernels once (the decoder has none left); its
    # logits are the adapted model's (checked against peft just above)
    from gpt2jax.generate import Generator, Sampling
    from gpt2jax.tokenizer import gpt2_tokenizer

    tok = gpt2_tokenizer()
    gen = Generator(model, tok)
    assert not gen.cfg.lora_rank
    prompt = "The quick brown fox jumps over"
    (sample,) = gen.generate([prompt], sampling=Sampling(greedy=True), max_new_tokens=1)
    want = np.asarray(model(np.array([tok.encode(prompt)])))[0, -1]
    decoder = nnx.merge(gen.graphdef, gen.state)
    got = np.asarray(decoder(np.array([tok.encode(prompt)])))[0, -1]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert sample.token_ids == [int(np.argmax(got))]
    assert np.abs(want - np.asarray(base_model(np.array([tok.encode(prompt)])))[0, -1]).max() \
        > 1e-3  # the adapters matter: a decoder that dropped them would fail


def test_fresh_adapters_leave_the_model_unchanged():
    """Step 0 equals the base: B starts at zero (A does not); logits move 1e-3 once B is
    not zero."""
    from flax import nnx
    from test_optim import TINY

    from gpt2jax.config import LoraSection
    from gpt2jax.model import create_model, from_values
    from gpt2jax.params import flat
    from gpt2jax.run import lora_fields

    mcfg = TINY.replace(**lora_fields(LoraSection(rank=4, targets=TARGETS)))
    base = create_model(TINY, 0)
    values = {**flat(nnx.state(create_model(mcfg, 1), nnx.Param)),
              **flat(nnx.state(base, nnx.Param))}
    assert np.abs(np.asarray(values["h.0.attn.c_attn_lora_a"])).min() > 0
    # jitted (eager takes seconds of op-by-op compiles): XLA fuses the zero term's add
    # into the products, which moves float32 rounding by ~1e-7 (eager: bit-equal)
    forward = nnx.jit(lambda model, ids: model(ids))
    ids = IDS % TINY.vocab_size
    np.testing.assert_allclose(np.asarray(forward(from_values(mcfg, values), ids)),
                               np.asarray(forward(base, ids)), rtol=0, atol=1e-6)
    values["h.1.mlp.c_fc_lora_b"] = np.full((4, 128), 0.05, np.float32)
    moved = np.asarray(forward(from_values(mcfg, values), ids)) - np.asarray(forward(base, ids))
    assert np.abs(moved).max() > 1e-3


# ---------------------------------------------------------------- sharded


def test_lora_on_a_2x2x2_mesh_matches_one_device():
    """Three LoRA steps on 8 devices (data, fsdp, tensor = 2, 2, 2) against 1 device from
    the same host parameters and batches, layers scanned and rematerialised: losses within
    1e-6 relative, parameters within 2e-5 (Adam magnifies reduction-order noise, as in
    test_sharding); the adapters really are split over the mesh."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    from test_optim import TINY, lm_batch

    from gpt2jax.config import load_config
    from gpt2jax.params import flat
    from gpt2jax.run import initial_params, lora_fields
    from gpt2jax.sharding import global_batch, make_mesh
    from gpt2jax.train import build_step

    cfg = load_config(None, ["--data.train=unused", "--optim.lr=1e-2", "--model.lora.rank=4",
                             f"--model.lora.targets={TARGETS}", "--model.lora.dropout=0.1"])
    mcfg = TINY.replace(scan_layers=True, remat="dots", **lora_fields(cfg.model.lora))
    host = None
    out = {}
    for name, mesh in (("one", make_mesh(devices=jax.devices()[:1])),
                       ("mesh", make_mesh(2, 2, 2))):
        plan = build_step(cfg, mcfg, mesh, 10)
        if host is None:
            host = jax.tree.map(np.asarray, initial_params(mcfg, 0, None, plan.param_sh))
        params = jax.device_put(host, plan.param_sh)
        opt = jax.jit(plan.tx.init, out_shardings=plan.opt_sh)(params)
        losses = []
        for i in range(3):
            batch = global_batch(mesh, lm_batch(1, 8, 16, seed=i), leading=1)
            params, opt, m = plan.train_step(params, opt, batch, jnp.int32(i))
            losses.append(float(m["loss"]))
        out[name] = (flat(params), losses)
    (ref, ref_losses), (got, losses) = out["one"], out["mesh"]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    # stacked: a leading (unsharded) layer axis
    assert got["h.attn.c_attn_lora_b"].sharding.spec == P(None, None, None, "tensor", None)
    assert got["h.mlp.c_fc_lora_a"].sharding.spec == P(None, "fsdp", None)
    for key, value in got.items():
        np.testing.assert_allclose(np.asarray(value), np.asarray(ref[key]), atol=2e-5,
                                   err_msg=key)
    assert np.abs(np.asarray(got["h.mlp.c_proj_lora_b"])).min() > 0


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("override,message", [
    ("--model.lora.rank=0", "model.lora.rank: must be >= 1"),
    ("--model.lora.targets=[c_attn,q_proj]", "'q_proj' is not a GPT-2 projection"),
    ("--model.lora.adapter=/nonexistent/adapter", "expected a PEFT adapter directory"),
    ("--model.lora.rank=8", "has r=4 but model.lora.rank gives 8"),
    ("--model.lora.wrong=1", "model.lora.wrong: unknown key"),
    ("--data.add_special_tokens=[<|x|>]", "add embeddings (--model.lora.train=[embeddings])"),
])
def test_bad_lora_settings_exit_2_with_one_line(override, message, peft_adapter, hf_lm_dir,
                                                tmp_path, cli):
    adapter, _ = peft_adapter
    cfg = {"model": {"init": str(hf_lm_dir[0]),
                     "lora": {"rank": 4, "alpha": 12, "targets": ["c_attn", "c_proj"],
                              "adapter": str(adapter)}},
           "data": {"train": str(write_text(tmp_path / "t.txt", n_docs=4, words=20))},
           "train": {"steps": 1, "batch_size": 8, "seq_len": 16, "eval_every": 0,
                     "run_dir": str(tmp_path / "run"), "progress": "none"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    res = cli("train", tmp_path / "cfg.yaml", override)
    assert res.code == 2, res.err
    assert res.last_err.startswith("gpt2jax: error: ") and message in res.last_err, res.err
    assert "Traceback" not in res.err


def test_adapter_of_another_shape_is_refused(peft_adapter, base_model, tmp_path):
    from safetensors.numpy import load_file, save_file

    from gpt2jax.errors import UserError
    from gpt2jax.hf import read_adapter

    adapter, _ = peft_adapter
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = "base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight"
    tensors[key] = tensors[key][:, :64].copy()  # as if the base's MLP were narrower
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    mcfg = _lora_model_config(base_model)
    with pytest.raises(UserError, match=r"mlp.c_proj.lora_A.weight has shape \(4, 64\) but "
                                        r"the base model \(model.init\) implies \(4, 128\)"):
        read_adapter(bad, mcfg)
    # a tensor the model has no place for (a third layer of a 2-layer base) is refused too
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.transformer.h.2.ln_1.weight"] = np.ones(128, np.float32)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(UserError, match=r"h\.2\.ln_1\.weight is no parameter"):
        read_adapter(bad, mcfg)


def test_bench_lora_counts_trainable_parameters_and_optimizer_state(cli):
    """`gpt2jax bench --lora 2` on a 1-layer, 32-wide model: the counts by hand."""
    res = cli("bench", "--lora", "2", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
              "--vocab-size", "256", "--n-positions", "16", "--seq-len", "8",
              "--batch-size", "2", "--steps", "1", "--warmup", "1", "--rounds", "1", "--json")
    assert res.code == 0, res.err
    r = res.json
    d, v, p = 32, 256, 16
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    full = v * d + p * d + block + 2 * d
    lora = 2 * (d + 3 * d)  # rank 2 on c_attn: A (32, 2) and B (2, 96)
    assert r["full"]["trainable_params"] == full and r["lora_side"]["trainable_params"] == lora
    # Adam's mu and nu in float32, plus a few step counters
    for side, n in ((r["full"], full), (r["lora_side"], lora)):
        assert 8 * n <= side["optimizer_state_bytes"] < 8 * n + 64, side
    assert r["full"]["step_seconds"] > 0 and r["lora_side"]["step_seconds"] > 0


@pytest.mark.parametrize("head,groups,message", [
    ("attention_pool", [], "attention_pool head has no transformers class"),
    ("lm", ["embeddings"], "trained the token embeddings"),
])
def test_adapter_export_refuses_what_peft_cannot_load(head, groups, message, tmp_path):
    from test_optim import TINY

    from gpt2jax.config import LoraSection
    from gpt2jax.errors import UserError
    from gpt2jax.hf import export_adapter
    from gpt2jax.model import create_model
    from gpt2jax.run import lora_fields

    mcfg = TINY.replace(head=head, num_labels=2, **lora_fields(LoraSection(rank=2)))
    with pytest.raises(UserError, match=message):
        export_adapter(create_model(mcfg), tmp_path / "out", groups, "base")
    assert not (tmp_path / "out").exists()


def test_optim_freeze_and_lora_combine():
    """A parameter trains only if LoRA lets it and no optim.freeze pattern matches it."""
    from gpt2jax.config import LoraSection, OptimSection
    from gpt2jax.optim import frozen_fn

    frozen = frozen_fn(OptimSection(freeze=[r"^h\.0\."]), LoraSection(targets=["c_attn"]))
    assert frozen("h.0.attn.c_attn_lora_a") and frozen("h.0.attn.c_attn_lora_b")
    assert not frozen("h.1.attn.c_attn_lora_a") and not frozen("h.1.attn.c_attn_lora_b")
    assert frozen("h.1.attn.c_attn_kernel") and frozen("wte")  # the base, under LoRA
    assert not frozen_fn(OptimSection(), LoraSection())("score.kernel")  # the head trains
