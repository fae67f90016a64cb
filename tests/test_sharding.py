"""Meshes and sharding rules; sharded train steps on 8 fake CPU devices match one device.

Tolerance: losses agree to 1e-6 relative (measured: 2.6e-7). Parameters after two AdamW
steps (lr 1e-3) agree to 2e-5 absolute (measured: 1.2e-6 at most): a sharded step sums in
another order (~1e-8 in the gradients) and Adam's division by sqrt(v) magnifies that on
near-zero gradients (about 1e-5 after a few steps), so bit-equality is not expected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from test_optim import OPTIM, reference_run, tiny_setup

from gpt2jax.errors import UserError
from gpt2jax.optim import make_optimizer
from gpt2jax.params import flat as flat_params
from gpt2jax.sharding import (
    batch_sharding,
    global_batch,
    make_mesh,
    mesh_shape,
    replicated,
    spec_for,
    state_shardings,
)
from gpt2jax.train import make_train_step


def test_mesh_shape_fills_the_rest_and_checks_the_product():
    assert mesh_shape(-1, 1, 1, 8) == (8, 1, 1)
    assert mesh_shape(2, -1, 2, 8) == (2, 2, 2)
    assert mesh_shape(1, 1, -1, 8) == (1, 1, 8)
    with pytest.raises(UserError, match="3 x 1 x 1 = 3, but there are 8 devices"):
        mesh_shape(3, 1, 1, 8)
    with pytest.raises(UserError, match="cannot be split"):
        mesh_shape(-1, 3, 1, 8)
    mesh = make_mesh(2, 2, 2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_spec_for_maps_logical_axes_and_replicates_uneven_dims():
    mesh = make_mesh(2, 2, 2)
    assert spec_for(("embed", "mlp"), (32, 128), mesh) == P("fsdp", "tensor")
    assert spec_for(("heads", "head_dim", "embed"), (2, 16, 32), mesh) == P("tensor", None, "fsdp")
    # GPT-2's 50257-token vocabulary does not divide by 2: replicated, embed still sharded
    assert spec_for(("vocab", "embed"), (50257, 32), mesh) == P(None, "fsdp")
    assert spec_for(("vocab", "embed"), (50258, 32), mesh) == P("tensor", "fsdp")
    # scan-stacked layers carry an extra leading (replicated) layer axis
    assert spec_for(("embed", "mlp"), (4, 32, 128), mesh) == P(None, "fsdp", "tensor")
    # size-1 mesh axes are dropped: pure data parallel replicates every weight
    assert spec_for(("embed", "mlp"), (32, 128), make_mesh(8, 1, 1)) == P(None, None)
    assert batch_sharding(mesh, 3, leading=1).spec == P(None, ("data", "fsdp"), None)
    with pytest.raises(KeyError, match="no sharding rule"):
        spec_for(("nonsense",), (4,), mesh)


@pytest.fixture(scope="module")
def setup():
    """The tiny model on the host, one optimizer, and the one-device reference run."""
    graphdef, params = tiny_setup()
    batches, ref, ref_losses = reference_run()
    assert len(jax.devices()) == 8  # conftest's fake CPU devices
    assert params["wte"][...].sharding.device_set == {jax.devices()[0]}
    tx, schedule = make_optimizer(OPTIM, 10, params)
    host = jax.tree.map(np.asarray, params)
    host_opt = jax.tree.map(np.asarray, jax.jit(tx.init)(params))
    return graphdef, host, host_opt, tx, schedule, batches, ref, ref_losses


def sharded_run(setup, mesh):
    """The trainer's recipe: params and optimizer state sharded by the rules, batch split
    over data x fsdp, jitted step with donation. Returns (params, losses)."""
    graphdef, host, host_opt, tx, schedule, batches = setup[:6]
    param_sh = state_shardings(host, mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, host_opt, param_sh,
                                   transform_non_params=lambda _: replicated(mesh))
    params, opt_state = jax.device_put(host, param_sh), jax.device_put(host_opt, opt_sh)
    step = jax.jit(make_train_step(graphdef, tx, False, 1, jax.random.key(0), mesh=mesh),
                   donate_argnums=(0, 1), out_shardings=(param_sh, opt_sh, replicated(mesh)))
    losses = []
    for i, b in enumerate(batches):
        params, opt_state, m = step(params, opt_state, global_batch(mesh, b, leading=1),
                                    jnp.int32(i))
        losses.append(float(m["loss"]))
    assert jax.tree.leaves(opt_state)[1].sharding.mesh == mesh  # moments live on the mesh
    return params, losses


MESHES = {
    "data8": ((8, 1, 1), {}),
    "fsdp4": ((2, 4, 1), {"h.0.mlp.c_fc_kernel": P("fsdp", None), "wte": P(None, "fsdp")}),
    "tensor2": ((4, 1, 2), {"h.0.mlp.c_fc_kernel": P(None, "tensor"),
                            "h.1.attn.c_attn_kernel": P(None, None, "tensor", None),
                            "wte": P("tensor", None)}),
    "mixed": ((2, 2, 2), {"h.0.mlp.c_fc_kernel": P("fsdp", "tensor"),
                          "h.0.attn.c_proj_kernel": P("tensor", None, "fsdp"),
                          "wte": P("tensor", "fsdp")}),
}


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_steps_match_one_device(setup, name):
    ref, ref_losses = setup[-2:]
    shape, expected_specs = MESHES[name]
    params, losses = sharded_run(setup, make_mesh(*shape))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    flat = flat_params(params)
    for key, spec in expected_specs.items():  # weights really are split across devices
        arr = flat[key]
        assert arr.sharding.spec == spec, (key, arr.sharding.spec)
        assert arr.addressable_shards[0].data.size < arr.size
    if name == "data8":  # replicated weights, one full copy per device
        assert all(v.sharding.is_fully_replicated for v in flat.values())
    for key, value in flat.items():
        np.testing.assert_allclose(np.asarray(value), ref[key], atol=2e-5, err_msg=key)


def test_sharded_chunked_loss_and_xla_attention_match_one_device(setup):
    """model.loss_chunk (3 positions a chunk, not dividing 16) and model.attention=xla on
    the mixed mesh, against the full-logits explicit one-device reference."""
    from flax import nnx
    from test_optim import TINY

    from gpt2jax.model import abstract_model

    ref, ref_losses = setup[-2:]
    graphdef, _ = nnx.split(abstract_model(TINY.replace(loss_chunk=24, attention="xla")))
    params, losses = sharded_run((graphdef, *setup[1:6]), make_mesh(2, 2, 2))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for key, value in flat_params(params).items():
        np.testing.assert_allclose(np.asarray(value), ref[key], atol=2e-5, err_msg=key)


_WARNING_SCRIPT = """
import os, sys, tempfile
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, {tests!r})
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from test_optim import OPTIM, TINY, lm_batch
from gpt2jax import model as model_mod
from gpt2jax.model import create_model
from gpt2jax.optim import make_optimizer
from gpt2jax.sharding import make_mesh, state_shardings, replicated, global_batch
from gpt2jax.train import make_train_step


def run(shape, cls):
    cfg = TINY.replace(head="sequence", num_labels=3, pad_token_id=0) if cls else TINY
    graphdef, params = nnx.split(create_model(cfg, 0))
    tx, schedule = make_optimizer(OPTIM, 10, params)
    mesh = make_mesh(*shape)
    param_sh = state_shardings(params, mesh)
    opt = jax.jit(tx.init)(params)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt, param_sh,
                                   transform_non_params=lambda _: replicated(mesh))
    p, o = jax.device_put(params, param_sh), jax.device_put(opt, opt_sh)
    step = jax.jit(make_train_step(graphdef, tx, cls, 1, jax.random.key(0),
                                   lm_loss_weight=0.5 if cls else 0.0, mesh=mesh),
                   out_shardings=(param_sh, opt_sh, replicated(mesh)))
    if cls:
        rng = np.random.default_rng(0)
        mask = np.ones((1, 8, 16), np.int32)
        mask[0, :4, :3] = 0  # left padding: positions from the mask, a gather
        b = dict(input_ids=rng.integers(1, 256, (1, 8, 16)).astype(np.int32),
                 attention_mask=mask, labels=rng.integers(0, 3, (1, 8)).astype(np.int32))
    else:
        b = lm_batch(1, 8, 16, seed=10)
    return float(step(p, o, global_batch(mesh, b, leading=1), jnp.int32(0))[2]["loss"])


def warned(fn):
    # the warning comes from C++ on file descriptor 2: point it at a file meanwhile
    with tempfile.TemporaryFile() as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            loss = fn()
        finally:
            os.dup2(saved, 2)
        f.seek(0)
        text = f.read().decode(errors="replace")
    assert np.isfinite(loss)
    return "Involuntary full rematerialization" in text


out = dict(lm=warned(lambda: run((2, 2, 2), False)), cls=warned(lambda: run((4, 2, 1), True)))
model_mod.constrain_batch = lambda x: x  # control: the model without its constraints
model_mod.unshard_embed = lambda table, axis: table
out["control"] = warned(lambda: run((4, 2, 1), False))
print(out)
"""


def test_sharded_step_compiles_without_involuntary_rematerialization():
    """The SPMD partitioner's "Involuntary full rematerialization" warning (C++ stderr, so
    a subprocess) is gone with the model's activation constraints on data x fsdp x tensor
    meshes (LM; classification with left padding and the auxiliary LM loss); the control
    compile without them shows it, so the check can fail."""
    import subprocess
    import sys
    from pathlib import Path

    script = _WARNING_SCRIPT.format(tests=str(Path(__file__).parent))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == \
        "{'lm': False, 'cls': False, 'control': True}", res.stdout


def _all_gathers_in_tensor_parallel_step(merged_qkv: bool, monkeypatch) -> list[str]:
    """The all-gathers XLA puts in a (4, 1, 2) train step of a one-layer model."""
    from flax import nnx

    from gpt2jax import model as model_mod
    from gpt2jax.model import GPT2Config, create_model

    if merged_qkv:  # control: the one (d, 3 * H * K) view the decoder uses
        project = model_mod.Attention._project_qkv
        monkeypatch.setattr(model_mod.Attention, "_project_qkv",
                            lambda self, x, merged=False, key=None: project(self, x, True, key))
    cfg = GPT2Config(vocab_size=128, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    graphdef, params = nnx.split(create_model(cfg, 0))
    tx, schedule = make_optimizer(OPTIM, 10, params)
    mesh = make_mesh(4, 1, 2)
    params = jax.device_put(params, state_shardings(params, mesh))
    opt = jax.jit(tx.init)(params)
    tokens = np.random.default_rng(0).integers(0, 128, (1, 4, 17)).astype(np.int32)
    batch = global_batch(mesh, {"tokens": tokens, "weights": np.ones(tokens.shape, np.float32)},
                         leading=1)
    step = jax.jit(make_train_step(graphdef, tx, False, 1, jax.random.key(0), mesh=mesh))
    text = step.lower(params, opt, batch, jnp.int32(0)).compile().as_text()
    return [line for line in text.splitlines() if "all-gather" in line and " = " in line]


def test_tensor_parallel_attention_keeps_its_kernel_split(monkeypatch):
    """q, k, v are projected with per-q/k/v views of the heads-split kernel, so a
    tensor-parallel step gathers nothing; the merged view (the control) makes the
    partitioner all-gather the whole (d, 3, H, K) kernel, so the check can fail."""
    assert _all_gathers_in_tensor_parallel_step(False, monkeypatch) == []
    gathered = _all_gathers_in_tensor_parallel_step(True, monkeypatch)
    assert any("f32[32,3,2,16]" in line for line in gathered), gathered
