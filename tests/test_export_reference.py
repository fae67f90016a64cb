"""Export and import checked by transformers itself: non-default architectures, bfloat16.

A gpt2jax model built with each config.json field that changes the maths (relu,
layer_norm_epsilon, scale_attn_by_inverse_layer_idx, n_inner, unscaled attention) is
exported; transformers loads it with no warnings and its float32 logits equal gpt2jax's.
A transformers checkpoint saved in bfloat16 (safetensors holds BF16, which numpy has no
type for) imports, and gives the logits torch computes from the same weights.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_hf import _assert_clean_load
from test_model import _torch_logits, forward, random_model

from gpt2jax.model import GPT2Config

CONFIGS = {
    "relu_eps_inner": dict(activation_function="relu", layer_norm_epsilon=1e-2, n_inner=40),
    "inverse_layer_scale_gelu": dict(scale_attn_by_inverse_layer_idx=True, n_layer=3,
                                     activation_function="gelu"),
    "unscaled_attention": dict(scale_attn_weights=False, n_inner=16),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_of_non_default_configs_equals_transformers(name, tmp_path):
    from transformers import AutoModelForCausalLM

    from gpt2jax.hf import export_hf

    cfg = GPT2Config(**{**dict(vocab_size=96, n_positions=24, n_embd=24, n_head=3, n_layer=2),
                        **CONFIGS[name]})
    model = random_model(cfg, seed=6, std=0.3)  # large weights: the choices matter
    out = export_hf(model, tmp_path / name)
    hf, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    _assert_clean_load(info)
    for key, value in CONFIGS[name].items():
        assert getattr(hf.config, key) == value, key
    ids = np.random.RandomState(1).randint(0, 96, (2, 17))
    ours, theirs = forward(model, ids), _torch_logits(hf.eval(), ids)
    assert np.abs(ours - theirs).max() <= 1e-4 * max(1.0, np.abs(theirs).max())
    # the same weights with the default maths give other logits: the options matter
    maths = {k: getattr(GPT2Config(), k) for k in CONFIGS[name] if k not in ("n_inner",
                                                                              "n_layer")}
    default = random_model(cfg.replace(**maths), seed=6, std=0.3)
    assert np.abs(forward(default, ids) - ours).max() > 1e-2


def test_bfloat16_checkpoint_imports_and_equals_torch(hf_lm_dir, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import GPT2LMHeadModel

    from gpt2jax.hf import load_hf_dir

    src, _ = hf_lm_dir
    bf16 = GPT2LMHeadModel.from_pretrained(str(src), dtype=torch.bfloat16)
    bf16.save_pretrained(str(tmp_path / "bf16"))
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("transformer.h.0.mlp.c_fc.weight").dtype == torch.bfloat16
    model = load_hf_dir(tmp_path / "bf16")
    ref = bf16.float().eval()  # the same bf16-rounded weights, computed in float32
    ids = np.random.RandomState(4).randint(0, 50000, (2, 12))
    ours, theirs = forward(model, ids), _torch_logits(ref, ids)
    assert ours.dtype == np.float32
    assert np.abs(ours - theirs).max() <= 1e-4
    weights = np.asarray(model.h[0].mlp.c_fc_kernel[...])
    want = ref.transformer.h[0].mlp.c_fc.weight.detach().numpy()
    np.testing.assert_array_equal(weights, want)  # bf16 -> float32 is exact
