"""`gpt2jax compile`: the train step compiled for TPU topologies on this CPU (libtpu's
compiler, installed by `make test` through the `tpu` extra).

All compiles live in this one file, so with `--dist loadfile` one pytest worker holds
libtpu. Expected numbers are computed here from GPT-2's shapes, Adam's two moments, the
batch and the mesh by hand, never from gpt2jax's own sharding code.
"""

from __future__ import annotations

import math
import sys

import pytest

from gpt2jax.compile import collectives, parse_topology

# A one-block toy whose every per-chip array has its last two dimensions in multiples of
# TPU's (8, 128) f32 tile on both meshes below, so no padding applies to parameters,
# optimizer state or batch: n_embd 2048 / fsdp 4 = 512; 16 heads / tensor 2 = 8 heads of
# 128; vocab 1024 / tensor 2; blocks of seq_len + 1 = 128 tokens; 32 rows / 4 = 8 rows.
# (With 2 heads per chip, say, TPU would pad c_attn's (heads, head_dim) tile from 2 to 8
# rows and the argument bytes would exceed this count.)
L, D, H, V, P, S, B = 1, 2048, 16, 1024, 128, 127, 32
TOY = f"""
model: {{n_layer: {L}, n_embd: {D}, n_head: {H}, vocab_size: {V}, n_positions: {P},
        dtype: bfloat16, remat: none, loss_chunk: 0, scan_layers: false, dropout: 0.0}}
data: {{train: not-read.txt}}
train: {{batch_size: {B}, seq_len: {S}, grad_accum: 1}}
"""
MESHES = {(1, 4, 1): "1x4x1", (2, 1, 2): "2x1x2"}


def _param_shapes() -> list[tuple[tuple[int, ...], str]]:
    """GPT-2's parameters (our layout) with the mesh axis that splits each: fsdp splits the
    embedding dimension, tensor splits heads, the MLP width and the vocabulary."""
    f = 4 * D
    return [((V, D), "tensor*fsdp"), ((P, D), "fsdp"), ((D,), ""), ((D,), "")] + L * [
        ((D,), ""), ((D,), ""),  # ln_1
        ((D, 3, H, D // H), "fsdp*tensor"), ((3, H, D // H), "tensor"),  # c_attn
        ((H, D // H, D), "tensor*fsdp"), ((D,), ""),  # attn c_proj
        ((D,), ""), ((D,), ""),  # ln_2
        ((D, f), "fsdp*tensor"), ((f,), "tensor"), ((f, D), "tensor*fsdp"), ((D,), ""),
    ]


def expected_argument_bytes(data: int, fsdp: int, tensor: int) -> int:
    """Per-chip bytes of the train step's arguments: float32 parameters and Adam's mu and
    nu (3 copies, each split by the mesh axes of its dimensions), the batch (int32 tokens
    and float32 weights, rows split over data x fsdp) and a few int32 scalars (ignored:
    under 1% here)."""
    split = {"": 1, "fsdp": fsdp, "tensor": tensor, "tensor*fsdp": tensor * fsdp,
             "fsdp*tensor": tensor * fsdp}
    params = sum(math.prod(shape) // split[axes] for shape, axes in _param_shapes())
    batch = 2 * B * (S + 1) // (data * fsdp)
    return 4 * (3 * params + batch)


def model_flops_per_chip(chips: int) -> float:
    """6 x (matmul weights) per token + the attention matmuls (12 L D S), over the chips."""
    matmul = L * (D * 3 * D + D * D + 2 * D * 4 * D) + V * D
    return B * S * (6 * matmul + 12 * L * D * S) / chips


@pytest.fixture(scope="module", autouse=True)
def full_optimization():
    """The memory and FLOP figures under test are those of a full compile (conftest turns
    most optimizations off for the CPU tests)."""
    import jax

    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = tmp_path_factory.mktemp("compile") / "toy.yaml"
    path.write_text(TOY)
    return path


@pytest.fixture(scope="module")
def compiled(toy):
    """Results of the toy's train step on a 4-chip v5e for both meshes (one compile each;
    the eval step, which the CLI tests below compile, is left out to save minutes)."""
    from gpt2jax.compile import compile_config
    from gpt2jax.config import load_config

    out = {}
    for (d, f, t), name in MESHES.items():
        cfg = load_config(toy, [f"--mesh.data={d}", f"--mesh.fsdp={f}", f"--mesh.tensor={t}"])
        out[name] = compile_config(cfg, "v5litepod-4", evaluate=False)
    return out


@pytest.mark.parametrize("mesh", MESHES)
def test_toy_fits_and_argument_bytes_match_the_shapes(compiled, mesh):
    r = compiled[MESHES[mesh]]
    assert r["fits"] and r["chips"] == 4 and r["mesh"] == dict(zip(("data", "fsdp", "tensor"),
                                                                   mesh))
    mem = r["train"]["memory"]
    expected = expected_argument_bytes(*mesh)
    assert mem["arguments"] == pytest.approx(expected, rel=0.01)
    # params and optimizer state are donated: their buffers are reused for the outputs
    assert mem["aliased"] >= 0.99 * (expected - 4 * 2 * B * (S + 1) // (mesh[0] * mesh[1]))
    assert mem["headroom"] == 16 * 2**30 - mem["total"] > 0


@pytest.mark.parametrize("mesh", MESHES)
def test_toy_flops_match_the_analytic_count(compiled, mesh):
    # no loops here (no scan, no grad accumulation, full logits): XLA's count covers the
    # whole step; the rest is the optimizer, softmax and LayerNorm, a few percent
    t = compiled[MESHES[mesh]]["train"]
    assert not t["loops"]
    assert t["flops"] == pytest.approx(model_flops_per_chip(4), rel=0.15)
    assert t["model_flops"] == pytest.approx(model_flops_per_chip(4), rel=1e-9)


def test_fsdp_gathers_weights_and_tensor_parallel_reduces_activations(compiled):
    fsdp = compiled["1x4x1"]["train"]["collectives"]
    tp = compiled["2x1x2"]["train"]["collectives"]
    # FSDP all-gathers every weight matrix at least once (bf16 copies: 2 bytes each)
    matrices = sum(math.prod(s) for s, axes in _param_shapes() if "fsdp" in axes)
    assert fsdp["all-gather"]["bytes"] >= 2 * matrices
    assert tp["all-reduce"]["count"] > 0


def test_report_lists_the_collectives_or_says_none(compiled):
    from gpt2jax.compile import format_report

    r = compiled["1x4x1"]
    line = next(x for x in format_report(r).splitlines() if x.startswith("collectives"))
    assert "all-gather" in line and "MiB" in line
    quiet = {**r, "train": {**r["train"], "collectives": {
        k: {**v, "count": 0} for k, v in r["train"]["collectives"].items()}}}
    assert "collectives per step: none" in format_report(quiet).splitlines()


def test_special_tokens_grow_the_vocabulary_as_training_does(toy):
    # GPT-2's 50257 tokens + one new one (no model or data is read), and the config itself
    # is left as loaded
    from gpt2jax.compile import model_for_compile
    from gpt2jax.config import load_config

    cfg = load_config(toy, ["--model.vocab_size=null", "--data.add_special_tokens=[<|x|>]"])
    assert model_for_compile(cfg).vocab_size == 50258 and cfg.model.vocab_size is None


def test_huge_batch_does_not_fit_exit_1(toy, cli):
    # 2^27 blocks of 128 tokens over 4 chips: int32 tokens + float32 weights are 32 GiB a
    # chip, twice a v5e's HBM, before any activation; the compiler gives up at once
    r = cli("compile", toy, "--topology", "v5e:2x2", "--mesh.fsdp=4", "--mesh.data=1",
            "--model.n_embd=128", "--model.n_head=1", f"--train.batch_size={2**27}",
            "--json")
    assert r.code == 1, r.err
    assert r.json["per_chip"]["batch"] == 2**27 * 128 * 8 // 4
    assert not r.json["fits"] and not r.json["train"]["fits"]
    assert "RESOURCE_EXHAUSTED" in r.json["train"]["compiler"]
    assert "fsdp" in r.json["advice"] and "grad_accum" in r.json["advice"]


def test_unknown_topology_exit_2(toy, cli):
    r = cli("compile", toy, "--topology", "v9x-16")
    assert r.code == 2
    assert r.last_err.startswith("gpt2jax: error: --topology 'v9x-16' is not a known")
    assert "v5litepod-N" in r.last_err and "v5e:4x4" in r.last_err


def test_mesh_that_does_not_divide_the_chips_exit_2(toy, cli):
    r = cli("compile", toy, "--topology", "v5e-8", "--mesh.data=3", "--mesh.fsdp=-1")
    assert r.code == 2
    assert "8 devices" in r.last_err and "data=3" in r.last_err


def test_multi_slice_exit_2(toy, cli):
    # libtpu builds 2 slices, but train's mesh (jax.make_mesh) spans one slice only
    r = cli("compile", toy, "--topology", "v5e-4", "--slices", "2")
    assert r.code == 2 and "one slice" in r.last_err


def test_without_libtpu_exit_2_names_the_extra(toy, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu -> ImportError
    r = cli("compile", toy, "--topology", "v5e-4")
    assert r.code == 2
    assert "pip install 'gpt2jax[tpu]'" in r.last_err


@pytest.mark.parametrize("name, libtpu, chips", [
    # Cloud TPU's accelerator types: v4 and v5p count TensorCores (2 per chip), v5e and
    # v6e chips (cloud.google.com/tpu/docs/v4, v5p, v5e, v6e: topology tables)
    ("v4-8", "v4:2x2x1", 4), ("v4-32", "v4:2x2x4", 16), ("v4-128", "v4:4x4x4", 64),
    ("v5p-8", "v5:2x2x1", 4), ("v5p-64", "v5:2x4x4", 32), ("v5litepod-1", "v5e:1x1", 1),
    ("v5litepod-8", "v5e:2x4", 8), ("v5e-16", "v5e:4x4", 16), ("v5e-256", "v5e:16x16", 256),
    ("v6e-64", "v6e:8x8", 64), ("v5e:4x8", "v5e:4x8", 32), ("v5p:2x2x2", "v5:2x2x2", 8),
])
def test_topology_names(name, libtpu, chips):
    t = parse_topology(name)
    assert (t.libtpu_name, t.chips) == (libtpu, chips)


def test_topology_devices_count_chips(cli):
    from gpt2jax.compile import topology_devices

    assert len(topology_devices(parse_topology("v4-8"))) == 4  # megacore: one device a chip
    assert len(topology_devices(parse_topology("v5litepod-1"))) == 1
    assert len(topology_devices(parse_topology("v5e-4", slices=2))) == 8


HLO = """
%body (p: (s32[], f32[256,128])) -> (s32[], f32[256,128]) {
  %ag = bf16[1024,128]{1,0} all-gather(bf16[256,128]{1,0} %x), dimensions={0}
  %ar = (f32[128]{0}, f32[64]{0}) all-reduce(%a, %b), to_apply=%add
}
%cond (p: (s32[], f32[256,128])) -> pred[] {
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}
ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[256,128]) while(%t), condition=%cond, body=%body
  %rs = f32[2,64]{1,0} reduce-scatter(f32[8,64]{1,0} %y), dimensions={0}
  %s = ((bf16[16]{0}), bf16[64]{0}) all-gather-start(%z), dimensions={0}
}
"""


def test_collectives_count_loop_iterations():
    c = collectives(HLO)
    # in the loop body, 12 iterations: 1024*128 bf16 gathered; (128 + 64) f32 reduced
    assert c["all-gather"] == {"count": 12 + 1, "bytes": 12 * 1024 * 128 * 2 + 64 * 2}
    assert c["all-reduce"] == {"count": 12, "bytes": 12 * (128 + 64) * 4}
    assert c["reduce-scatter"] == {"count": 1, "bytes": 2 * 64 * 4}
    assert c["all-to-all"]["count"] == 0


def test_cpu_commands_stay_off_the_tpu_plugin():
    from gpt2jax.compile import cpu_unless_tpu

    env: dict[str, str] = {}
    cpu_unless_tpu(env)  # libtpu installed, no TPU on this machine's PCI bus
    assert env == {"JAX_PLATFORMS": "cpu"}
    env = {"JAX_PLATFORMS": "tpu,cpu"}
    cpu_unless_tpu(env)  # the user's choice stands
    assert env == {"JAX_PLATFORMS": "tpu,cpu"}


# ---------------------------------------------------------------- NVIDIA GPU topologies


@pytest.mark.parametrize("name, xla, count", [
    # N GPUs, up to 8 on one HGX host, more in whole hosts: XLA's "slices x hosts x GPUs"
    ("h100-8", "1x1x8", 8), ("h200-1", "1x1x1", 1), ("a100-16", "1x2x8", 16),
    ("h100-4", "1x1x4", 4),
])
def test_gpu_topology_names(name, xla, count):
    t = parse_topology(name)
    assert (t.libtpu_name, t.chips, t.chip.gpu is not None) == (xla, count, True)


def test_gpu_topology_refusals_and_missing_plugin_exit_2(toy, cli):
    from gpt2jax.compile import cuda_plugin

    for name, msg in (("h100-12", "a multiple of 8"), ("b300-8", "not a known topology")):
        r = cli("compile", toy, "--topology", name)
        assert r.code == 2 and msg in r.last_err, r.last_err
    if cuda_plugin() is None:  # as in `make test`
        r = cli("compile", toy, "--topology", "h100-8")
        assert r.code == 2 and "pip install 'jax[cuda12]==0.10.2'" in r.last_err


def test_local_topology_names_the_machine():
    from types import SimpleNamespace as D

    from gpt2jax.compile import local_topology

    # device_kind strings as JAX reports them on each machine
    gpus = [D(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")] * 8
    assert local_topology(gpus) == "h100-8"
    assert local_topology([D(platform="tpu", device_kind="TPU v5 lite")] * 4) == "v5e-4"
    assert local_topology([D(platform="tpu", device_kind="TPU v4")] * 4) == "v4-8"  # megacore
    assert local_topology([D(platform="cpu", device_kind="cpu")]) is None
