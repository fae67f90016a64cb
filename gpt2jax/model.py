"""GPT-2 in Flax NNX: the backbone, the tied LM head and two classification heads.

Names follow the GPT-2 paper and Hugging Face (wte, wpe, h, ln_1, attn.c_attn, mlp.c_fc,
ln_f, score) so that the weight mapping in hf.py reads one-to-one. Every parameter carries
logical axis names (metadata `out_sharding`); sharding.py maps them onto a device mesh.

Layouts differ from HF where that lets tensor parallelism split heads cleanly: c_attn's
kernel is (embed, 3, heads, head_dim) rather than HF's packed (embed, 3*embed).
Parameters are float32; `dtype` is the compute dtype. Dropout is a pure function of an
explicit key so a training step is a deterministic function of (params, batch, step).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from . import kernels as K
from . import lora as L
from .config import MODEL_CHOICES
from .errors import UserError
from .sharding import chunk_positions, constrain_batch, require_cudnn, unshard_embed

PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
}
ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}
# Tokens per LM-loss chunk for model.loss_chunk=-1. CPU measured (docs/perf-notes.md
# sections 6-7: 256, or 1024 when glibc's malloc backs buffers with huge pages); GPU/TPU
# unmeasured, sized so a chunk's float32 logits stay under 1 GB at vocab 50257.
AUTO_LOSS_CHUNK = {"cpu": 256, "cpu+hugepages": 1024, "gpu": 4096, "tpu": 4096}
# model.kernels=auto and model.attention=auto per platform: docs/benchmarks.md ("Kernels
# per platform"); GPU follows the TPU evidence (XLA's GPU compiler reports no cost analysis).
AUTO_KERNELS = {"cpu": "custom", "gpu": "plain", "tpu": "plain"}
AUTO_ATTENTION = {"cpu": "explicit", "gpu": "explicit", "tpu": "xla"}
JNP_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclass(frozen=True)
class GPT2Config:
    """Architecture plus the compute choices that do not change the weights."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    initializer_range: float = 0.02
    # heads: "lm" (tied), "sequence" (GPT2ForSequenceClassification), "attention_pool"
    head: str = "lm"
    num_labels: int = 2
    labels: tuple[str, ...] = ()
    pad_token_id: int | None = None
    eos_token_id: int = 50256
    classifier_dropout: float = 0.1  # attention_pool head only
    # compute choices (config.MODEL_CHOICES); auto ones are fixed by resolve_auto, and
    # left open mean: attention explicit, kernels custom, loss_chunk full logits
    dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False
    attention: str = "explicit"
    # LM loss: -1 = auto, 0 = full logits, N = about N tokens per chunk (never all logits)
    loss_chunk: int = -1
    kernels: str = "auto"  # custom: kernels.py's custom VJPs; plain: the formulas beside them
    # LoRA (lora.py): rank 0 = none; targets are lora.MODULES entries ("attn.c_attn")
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # from JSON lists
        unknown = set(self.lora_targets) - set(L.MODULES)
        if self.lora_rank < 0 or unknown or bool(self.lora_rank) != bool(self.lora_targets):
            raise UserError(f"LoRA: rank {self.lora_rank} with targets "
                            f"{list(self.lora_targets)}: need rank >= 1 and targets from "
                            f"{', '.join(L.MODULES)}, or rank 0 and none")
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                            "pick dimensions where n_embd / n_head is a whole number")
        if self.activation_function not in ACTIVATIONS:
            raise UserError(f"activation_function={self.activation_function!r} is not "
                            f"supported; supported: {', '.join(ACTIVATIONS)}")
        for name, allowed in MODEL_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"model.{name}={getattr(self, name)!r}: choose one of "
                                f"{', '.join(allowed)}")
        if self.attention == "cudnn" and self.dtype == "float32":
            raise UserError("model.attention=cudnn needs a 16-bit compute dtype (cuDNN flash "
                            "attention has no float32 kernel): set model.dtype=bfloat16, or "
                            "use model.attention=xla")
        if self.loss_chunk < -1:
            raise UserError("model.loss_chunk must be -1 (auto), 0 (full logits) or a token "
                            f"count, got {self.loss_chunk}")
        if self.head != "lm" and self.num_labels < 1:
            raise UserError(f"model.num_labels must be >= 1, got {self.num_labels}")

    @property
    def loss_chunk_tokens(self) -> int:
        """Tokens per LM-loss chunk; 0 (full logits) while loss_chunk is still auto."""
        return max(self.loss_chunk, 0)

    @property
    def lora_scale(self) -> float:
        """LoRA's output scale alpha / r."""
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def compute_dtype(self):
        return JNP_DTYPES[self.dtype]

    def replace(self, **kw) -> GPT2Config:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_preset(cls, name: str, **kw) -> GPT2Config:
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **kw})


def resolve_auto(cfg: GPT2Config, platform: str, hugepages: bool = False) -> GPT2Config:
    """cfg with its automatic choices fixed for `platform` ("cpu", "tpu", "cuda" for an
    NVIDIA GPU, "gpu" for another GPU; `hugepages`: see AUTO_LOSS_CHUNK). Attention without
    attention dropout: cuDNN on NVIDIA GPUs with a 16-bit dtype, else AUTO_ATTENTION's."""
    gpu = "gpu" if platform == "cuda" else platform
    if cfg.loss_chunk < 0:
        key = "cpu+hugepages" if platform == "cpu" and hugepages else gpu
        cfg = cfg.replace(loss_chunk=AUTO_LOSS_CHUNK.get(key, AUTO_LOSS_CHUNK["gpu"]))
    if cfg.kernels == "auto":
        cfg = cfg.replace(kernels=AUTO_KERNELS.get(gpu, AUTO_KERNELS["gpu"]))
    if cfg.attention == "auto":
        no_dropout = cfg.attn_pdrop == 0.0
        if platform == "cuda" and cfg.dtype != "float32" and no_dropout:
            cfg = cfg.replace(attention="cudnn")
        else:
            pick = AUTO_ATTENTION.get(gpu, "explicit")
            cfg = cfg.replace(attention=pick if no_dropout else "explicit")
    return cfg


def param_count(cfg: GPT2Config) -> int:
    """Number of parameters (the tied LM head counted once)."""
    d, f, v, p, n = cfg.n_embd, cfg.inner, cfg.vocab_size, cfg.n_positions, cfg.n_layer
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    total = v * d + p * d + n * block + 2 * d
    if cfg.head == "sequence":
        total += d * cfg.num_labels
    elif cfg.head == "attention_pool":
        total += d + 2 * (d * d + d) + d * cfg.num_labels + cfg.num_labels
    return total


# ---------------------------------------------------------------- pure pieces


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when key is None (evaluation) or rate is 0."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _fold(key: jax.Array | None, i: int | jax.Array) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, i)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids that make a left-padded row compute exactly like the unpadded row."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of the rightmost real token in each row (works for left and right padding)."""
    t = jnp.arange(attention_mask.shape[-1])
    return jnp.max(jnp.where(attention_mask.astype(bool), t, 0), axis=-1)


def attention_mask_bias(
    q_len: int, k_len: int, key_mask: jax.Array | None, q_offset: jax.Array | int = 0
) -> jax.Array:
    """Boolean (B or 1, 1, q, k) mask: causal over slots (query i sits in slot q_offset +
    i, where the KV cache writes it), and keys that are real tokens."""
    q = q_offset + jnp.arange(q_len)
    k = jnp.arange(k_len)
    allowed = (k[None, :] <= q[:, None])[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask.astype(bool)[:, None, None, :]
    return allowed


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Position ids that restart at 0 wherever the segment id changes along a row
    (data.packing=documents: each document's piece of a block counts from 0)."""
    t = jnp.arange(segment_ids.shape[-1])
    change = jnp.concatenate([jnp.ones_like(segment_ids[..., :1], bool),
                              segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    return t - jax.lax.cummax(jnp.where(change, t, 0), axis=segment_ids.ndim - 1)


def _positions_and_mask(shape: tuple[int, int], attention_mask, position_ids, segment_ids,
                        cache, cache_index):
    """Position ids (None: 0..t-1, a slice of wpe) and the boolean attention mask; segments
    attend within themselves and count positions from 0, like rows of their own."""
    b, t = shape
    if segment_ids is not None:
        segment_ids = constrain_batch(segment_ids)  # batch-sharded like the tokens
        same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        if position_ids is None:
            position_ids = positions_from_segments(segment_ids)
        return position_ids, attention_mask_bias(t, t, attention_mask) & same
    if cache is not None:
        start = 0 if cache_index is None else cache_index
        if position_ids is None:
            position_ids = jnp.broadcast_to(start + jnp.arange(t), (b, t))
        return position_ids, attention_mask_bias(t, cache[0][0].shape[1], attention_mask, start)
    if position_ids is None and attention_mask is not None:
        position_ids = positions_from_mask(attention_mask)
    return position_ids, attention_mask_bias(t, t, attention_mask)


def _param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=axes)


_zeros = nnx.initializers.zeros
_ones = nnx.initializers.ones


def _normal(cfg: GPT2Config, proj: bool = False):
    """GPT-2's normal initialiser; residual projections scaled by 1/sqrt(2 * n_layer)."""
    std = cfg.initializer_range
    return nnx.initializers.normal(std / math.sqrt(2 * cfg.n_layer) if proj else std)


def _add_lora(module: nnx.Module, cfg: GPT2Config, rngs: nnx.Rngs, *targets: str) -> None:
    """The LoRA adapters of the module's adapted projections, as its attributes."""
    for target in targets:
        for name, p in L.make_params(cfg, target, rngs).items():
            setattr(module, name, p)


def _adapter(module: nnx.Module, leaf: str, x: jax.Array, key: jax.Array | None):
    """LoRA's term for projection `leaf` given its input x (dropout on x only), or None
    where the projection has no adapter."""
    a = getattr(module, f"{leaf}_lora_a", None)
    if a is None:
        return None
    cfg = module.cfg
    x = dropout(x, cfg.lora_dropout, key)
    return L.term(x, a[...], getattr(module, f"{leaf}_lora_b")[...], cfg.lora_scale)


def _plus(y: jax.Array, extra: jax.Array | None) -> jax.Array:
    return y if extra is None else y + extra


def _k(module, name: str):
    """The kernel `name` for the module's model.kernels (kernels.pick)."""
    return K.pick(name, module.cfg.kernels)


# ---------------------------------------------------------------- modules


class LayerNorm(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        self.scale = _param(rngs, _ones, (cfg.n_embd,), ("norm",))
        self.bias = _param(rngs, _zeros, (cfg.n_embd,), ("norm",))
        self.cfg = cfg

    def __call__(self, x: jax.Array) -> jax.Array:
        eps = self.cfg.layer_norm_epsilon
        return _k(self, "layer_norm")(x, self.scale[...], self.bias[...], eps)


class Attention(nnx.Module):
    """Causal multi-head self-attention with packed q/k/v and an optional KV cache."""

    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        d, h, k, normal = cfg.n_embd, cfg.n_head, cfg.head_dim, _normal(cfg)
        self.c_attn_kernel = _param(rngs, normal, (d, 3, h, k), ("embed", "qkv", "heads",
                                                                 "head_dim"))
        self.c_attn_bias = _param(rngs, _zeros, (3, h, k), ("qkv", "heads", "head_dim"))
        self.c_proj_kernel = _param(rngs, _normal(cfg, proj=True), (h, k, d),
                                    ("heads", "head_dim", "embed"))
        self.c_proj_bias = _param(rngs, _zeros, (d,), ("norm",))
        _add_lora(self, cfg, rngs, "attn.c_attn", "attn.c_proj")
        self.cfg = cfg

    def __call__(self, x, mask, layer_idx, key=None, cache=None, cache_index=None):
        cfg = self.cfg
        scale = 1.0 / math.sqrt(cfg.head_dim) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale = scale / (layer_idx + 1.0)
        if cache is not None:
            out, cache = self._attend_cached(x, mask, scale, key, cache, cache_index)
        elif cfg.attention in ("explicit", "auto"):
            out = self._attend_explicit(x, mask, scale, key)
        else:
            out = self._attend_library(x, mask, scale, key)
        return dropout(self._project_out(out, key), cfg.resid_pdrop, _fold(key, 1)), cache

    def _project_qkv(self, x, merged: bool = False, key=None):
        """q, k, v as (B, T, H, K), each a plain (tokens, d) @ (d, H * K) product.

        One einsum into (3, B, H, T, K) made XLA copy x (or, decoding, the kernel)
        transposed on every layer. One product per q/k/v keeps a kernel split along `heads`
        split alike in each view; `merged` (decoding, one device) takes one (d, 3 * H * K)
        view instead, as XLA copied the strided per-q/k/v slices on every token.
        """
        b, t, d = x.shape
        w = self.c_attn_kernel[...].astype(x.dtype)
        linear = _k(self, "linear")
        bias = self.c_attn_bias[...].astype(x.dtype)
        extra = _adapter(self, "c_attn", x, _fold(key, 2))  # (B, T, 3, H, K) or None
        if merged:
            qkv = linear(x, w.reshape(d, -1), bias.reshape(-1)).reshape(b, t, *w.shape[1:])
            qkv = _plus(qkv, extra)
            return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        return tuple(_plus(linear(x, w[:, i].reshape(d, -1), bias[i].reshape(-1))
                           .reshape(b, t, *w.shape[2:]), None if extra is None else extra[:, :, i])
                     for i in range(3))

    def _project_out(self, out, key=None):
        """(B, T, H, K) attention output -> (B, T, d): c_proj as one plain product."""
        b, t, h, k = out.shape
        out = out.reshape(b, t, h * k)
        w = self.c_proj_kernel[...].astype(out.dtype).reshape(h * k, -1)
        y = _k(self, "linear")(out, w, self.c_proj_bias[...].astype(out.dtype))
        return _plus(y, _adapter(self, "c_proj", out, _fold(key, 3)))

    def _attend_explicit(self, x, mask, scale, key):
        """No cache, model.attention explicit: attention_core in (B, H, T, K)."""
        cfg = self.cfg
        q, k, v = (jnp.swapaxes(y, 1, 2) for y in self._project_qkv(x, key=key))
        keep, rate = None, 0.0
        akey = _fold(key, 0)
        if akey is not None and cfg.attn_pdrop > 0.0:
            rate = float(cfg.attn_pdrop)
            b, h, t, _ = q.shape
            # the same draw as dropout() on the (B, H, T, T) probabilities
            keep = jax.random.bernoulli(akey, 1.0 - rate, (b, h, t, t))
        core = _k(self, "attention_core")
        out = core(q, k, v, mask, jnp.asarray(scale, jnp.float32), keep, rate)
        return jnp.swapaxes(out, 1, 2)

    def _attend_library(self, x, mask, scale, key):
        """No cache, model.attention xla / cudnn: jax.nn.dot_product_attention with the
        explicit path's mask (a fully masked padding row is a uniform average in both)."""
        cfg, dt = self.cfg, x.dtype
        if key is not None and cfg.attn_pdrop > 0.0:
            # the library call has no dropout on the probabilities: refuse, not skip
            raise UserError(
                f"model.attention={cfg.attention} has no attention dropout "
                f"(jax.nn.dot_product_attention takes none), but attn_pdrop={cfg.attn_pdrop} "
                "would be applied in training; set model.dropout=0, or train with "
                "model.attention=explicit"
            )
        impl = None if cfg.attention == "xla" else "cudnn"
        if impl == "cudnn":
            require_cudnn()
        q, k, v = self._project_qkv(x, key=key)  # (B, T, N, H), the library's layout
        if impl == "cudnn" and not isinstance(scale, float):
            # cuDNN wants a static scale: a traced one (scan_layers with
            # scale_attn_by_inverse_layer_idx) is folded into q
            q, scale = (q * scale).astype(dt), 1.0
        if impl == "cudnn" and mask.shape[0] == 1:
            # no padding: the causal mask type, which never materialises a (T, T) mask
            return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                                implementation=impl)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)

    def _attend_cached(self, x, mask, scale, key, cache, cache_index):
        """Decoding: the new tokens' k/v go into the (B, S, H, K) cache at cache_index."""
        cfg, dt = self.cfg, x.dtype
        q, k, v = self._project_qkv(x, merged=True, key=key)
        ck, cv = cache
        k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
        scores = jnp.einsum("bqhk,bshk->bhqs", q, k.astype(dt)).astype(jnp.float32) * scale
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = dropout(probs, cfg.attn_pdrop, _fold(key, 0)).astype(dt)
        return jnp.einsum("bhqs,bshk->bqhk", probs, v.astype(dt)), (k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        d, f = cfg.n_embd, cfg.inner
        self.c_fc_kernel = _param(rngs, _normal(cfg), (d, f), ("embed", "mlp"))
        self.c_fc_bias = _param(rngs, _zeros, (f,), ("mlp",))
        self.c_proj_kernel = _param(rngs, _normal(cfg, proj=True), (f, d), ("mlp", "embed"))
        self.c_proj_bias = _param(rngs, _zeros, (d,), ("norm",))
        _add_lora(self, cfg, rngs, "mlp.c_fc", "mlp.c_proj")
        self.cfg = cfg

    def __call__(self, x, key=None):
        dt, linear = x.dtype, _k(self, "linear")
        h = linear(x, self.c_fc_kernel[...].astype(dt), self.c_fc_bias[...].astype(dt))
        h = _plus(h, _adapter(self, "c_fc", x, _fold(key, 2)))
        h = ACTIVATIONS[self.cfg.activation_function](h)
        y = linear(h, self.c_proj_kernel[...].astype(dt), self.c_proj_bias[...].astype(dt))
        y = _plus(y, _adapter(self, "c_proj", h, _fold(key, 3)))
        return dropout(y, self.cfg.resid_pdrop, key)


class Block(nnx.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.ln_2 = LayerNorm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, mask, layer_idx, key=None, cache=None, cache_index=None):
        a, cache = self.attn(self.ln_1(x), mask, layer_idx, _fold(key, 0), cache, cache_index)
        x = x + a
        x = x + self.mlp(self.ln_2(x), _fold(key, 1))
        return x, cache


class SequenceHead(nnx.Module):
    """GPT2ForSequenceClassification's `score`: Linear(n_embd, num_labels), no bias."""

    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        self.kernel = _param(rngs, _normal(cfg), (cfg.n_embd, cfg.num_labels), ("embed", "labels"))

    def __call__(self, h, attention_mask, key=None):
        if attention_mask is None:
            pooled = h[:, -1]
        else:
            pooled = h[jnp.arange(h.shape[0]), last_token_index(attention_mask)]
        return pooled.astype(jnp.float32) @ self.kernel[...]


class AttentionPoolHead(nnx.Module):
    """A learned query per head attends over projections of the final hidden states
    (padding masked out), then dropout and a classifier."""

    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        d, h, k, normal = cfg.n_embd, cfg.n_head, cfg.head_dim, _normal(cfg)
        self.query = _param(rngs, normal, (h, k), ("heads", "head_dim"))
        self.key_kernel = _param(rngs, normal, (d, h, k), ("embed", "heads", "head_dim"))
        self.key_bias = _param(rngs, _zeros, (h, k), ("heads", "head_dim"))
        self.value_kernel = _param(rngs, normal, (d, h, k), ("embed", "heads", "head_dim"))
        self.value_bias = _param(rngs, _zeros, (h, k), ("heads", "head_dim"))
        self.out_kernel = _param(rngs, normal, (d, cfg.num_labels), ("embed", "labels"))
        self.out_bias = _param(rngs, _zeros, (cfg.num_labels,), ("labels",))
        self.cfg = cfg

    def __call__(self, h, attention_mask, key=None):
        h = h.astype(jnp.float32)
        keys = jnp.einsum("btd,dhk->bthk", h, self.key_kernel[...]) + self.key_bias[...]
        vals = jnp.einsum("btd,dhk->bthk", h, self.value_kernel[...]) + self.value_bias[...]
        scores = jnp.einsum("bthk,hk->bht", keys, self.query[...]) / math.sqrt(self.cfg.head_dim)
        if attention_mask is not None:
            scores = jnp.where(attention_mask.astype(bool)[:, None, :], scores, -1e30)
        probs = jax.nn.softmax(scores, axis=-1)
        pooled = jnp.einsum("bht,bthk->bhk", probs, vals).reshape(h.shape[0], -1)
        pooled = dropout(pooled, self.cfg.classifier_dropout, key)
        return pooled @ self.out_kernel[...] + self.out_bias[...]


def _checkpointed(fn, remat: str):
    if remat == "full":
        return jax.checkpoint(fn)
    if remat == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return fn


class GPT2(nnx.Module):
    """GPT-2 backbone plus the head named by cfg.head.

    `__call__` gives LM logits (B, T, vocab) for head "lm" and class logits (B, labels)
    for the classification heads. `hidden_states` exposes the backbone (with an optional
    KV cache for decoding) and `lm_logits` the tied LM head.
    """

    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        self.cfg = cfg
        normal = _normal(cfg)
        self.wte = _param(rngs, normal, (cfg.vocab_size, cfg.n_embd), ("vocab", "embed"))
        self.wpe = _param(rngs, normal, (cfg.n_positions, cfg.n_embd), ("positions", "embed"))
        if cfg.scan_layers:
            self.h = stack_blocks([Block(cfg, rngs) for _ in range(cfg.n_layer)])
        else:
            self.h = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg, rngs)
        if cfg.head == "sequence":
            self.score = SequenceHead(cfg, rngs)
        elif cfg.head == "attention_pool":
            self.pool = AttentionPoolHead(cfg, rngs)

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      position_ids: jax.Array | None = None, *,
                      dropout_key: jax.Array | None = None, cache: list | None = None,
                      cache_index: jax.Array | int | None = None,
                      segment_ids: jax.Array | None = None):
        """Final hidden states (after ln_f) and the updated cache.

        Without a cache, attention_mask is (B, T) over the input. With a cache (a list of
        per-layer (k, v) arrays of shape (B, S, heads, head_dim)), the input is written at
        slot cache_index and attention_mask is (B, S) over all cache slots. segment_ids
        (B, T), no cache: packed documents, each attending within itself from position 0.
        """
        cfg = self.cfg
        position_ids, mask = _positions_and_mask(input_ids.shape, attention_mask, position_ids,
                                                 segment_ids, cache, cache_index)
        x = jnp.take(unshard_embed(self.wte[...], "vocab"), input_ids, axis=0)
        if position_ids is None:  # a slice, not a gather: simpler to shard and to differentiate
            x = x + self.wpe[...][:input_ids.shape[1]][None]
        else:
            x = x + jnp.take(unshard_embed(self.wpe[...], "positions"), position_ids, axis=0)
        x = dropout(x.astype(cfg.compute_dtype), cfg.embd_pdrop, _fold(dropout_key, 1_000_001))
        x = constrain_batch(x)
        if cache is None:
            return constrain_batch(self.ln_f(self._blocks(x, mask, dropout_key))), None
        new_cache = []
        for i, block in enumerate(unstack_blocks(self.h) if cfg.scan_layers else self.h):
            x, layer_cache = block(x, mask, i, _fold(dropout_key, i), cache[i], cache_index)
            x = constrain_batch(x)
            new_cache.append(layer_cache)
        return constrain_batch(self.ln_f(x)), new_cache

    def _blocks(self, x, mask, dropout_key):
        """The blocks without a cache: a scan (scan_layers) or a loop, each under cfg.remat."""
        cfg = self.cfg

        def run(graphdef, state, x, i):
            return nnx.merge(graphdef, state)(x, mask, i, _fold(dropout_key, i))[0]

        if cfg.scan_layers:
            graphdef, stacked = nnx.split(self.h)

            def body(carry, xs):
                return constrain_batch(run(graphdef, xs[0], carry, xs[1])), None

            layers = (stacked, jnp.arange(cfg.n_layer))
            return jax.lax.scan(_checkpointed(body, cfg.remat), x, layers)[0]
        for i, block in enumerate(self.h):
            if cfg.remat == "none":
                x = block(x, mask, i, _fold(dropout_key, i))[0]
            else:
                gd, st = nnx.split(block)
                x = _checkpointed(lambda st, x, i=i, gd=gd: run(gd, st, x, i), cfg.remat)(st, x)
            x = constrain_batch(x)
        return x

    def lm_logits(self, h: jax.Array) -> jax.Array:
        """Tied LM head: logits in float32."""
        lead, d = h.shape[:-1], h.shape[-1]
        logits = _k(self, "tied_head")(h.reshape(-1, d), self.wte[...].astype(h.dtype))
        return logits.reshape(*lead, -1).astype(jnp.float32)

    def token_nll(self, h: jax.Array, targets: jax.Array) -> jax.Array:
        """Per-token LM cross-entropy (B, T) float32 of hidden states h against targets:
        through the full logits, or chunked_nll over chunks of about cfg.loss_chunk_tokens
        tokens per device (chunk_positions)."""
        size = chunk_positions(self.cfg.loss_chunk_tokens, h.shape)
        if size == 0:
            return K.optax_nll(self.lm_logits(h), targets)
        return _k(self, "chunked_nll")(h, self.wte[...].astype(h.dtype), targets, size)

    def lm_loss_sum(self, h: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
        """sum(weights * token_nll(h, targets)) for training, chunked through fused_nll_sum
        (gradients made in the forward pass) as token_nll chunks."""
        size = chunk_positions(self.cfg.loss_chunk_tokens, h.shape)
        if size == 0:
            return jnp.sum(self.token_nll(h, targets) * weights)
        return _k(self, "fused_nll_sum")(h, self.wte[...].astype(h.dtype), targets, weights, size)

    def classify(self, h, attention_mask=None, dropout_key=None) -> jax.Array:
        """Class logits (B, labels) of the final hidden states h."""
        if self.cfg.head == "lm":
            raise UserError("this model has an LM head only; train it with model.head=sequence")
        head = self.score if self.cfg.head == "sequence" else self.pool
        return head(h, attention_mask, _fold(dropout_key, 1_000_002))

    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, dropout_key=None):
        h, _ = self.hidden_states(input_ids, attention_mask, position_ids, dropout_key=dropout_key)
        if self.cfg.head == "lm":
            return self.lm_logits(h)
        return self.classify(h, attention_mask, dropout_key)

    def init_cache(self, batch: int, length: int, dtype=jnp.float32) -> list:
        """Zeroed KV cache: n_layer pairs of (batch, length, heads, head_dim)."""
        cfg = self.cfg
        shape = (batch, length, cfg.n_head, cfg.head_dim)
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.n_layer)]


def stack_blocks(blocks: list[Block]) -> Block:
    """One Block whose arrays carry a leading layer axis (for scan over layers)."""
    graphdef = nnx.split(blocks[0])[0]
    states = [nnx.split(b)[1] for b in blocks]
    return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))


def unstack_blocks(stacked: Block) -> list[Block]:
    """The inverse of stack_blocks."""
    graphdef, state = nnx.split(stacked)
    n = jax.tree.leaves(state)[0].shape[0]
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(n)]


def create_model(cfg: GPT2Config, seed: int = 0) -> GPT2:
    """A freshly initialised model on the default device (no mesh needed)."""
    with nnx.use_eager_sharding(False):
        return GPT2(cfg, nnx.Rngs(params=seed))


def from_values(cfg: GPT2Config, values: dict) -> GPT2:
    """A model of `cfg` from {parameter name: array} in either layer layout (params.py),
    without initialising random weights."""
    from . import params as P

    graphdef, abstract = nnx.split(abstract_model(cfg))
    values = P.relayout(values, cfg.n_layer, cfg.scan_layers, stack_fn=jnp.stack)
    want = {k: tuple(v.shape) for k, v in P.flat(abstract).items()}
    for name, shape in want.items():
        if name not in values:
            raise UserError(f"parameter {name} is missing")
        if tuple(values[name].shape) != shape:
            raise UserError(f"parameter {name} has shape {tuple(values[name].shape)}, "
                            f"expected {shape}")
    return nnx.merge(graphdef, P.unflat(abstract, {
        k: jnp.asarray(values[k], dtype=jnp.float32) for k in want}))


def abstract_model(cfg: GPT2Config) -> GPT2:
    """The model's structure with ShapeDtypeStruct leaves: no memory, no compute."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: GPT2(cfg, nnx.Rngs(params=0)))
