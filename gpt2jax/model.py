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
import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from .config import ATTENTION, DTYPES, HEADS, REMAT
from .errors import UserError

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
# Tokens per LM-loss chunk for model.loss_chunk=-1. CPU: 256 measured fastest (+15%
# tokens/s over full logits on the 4-layer bench config, docs/perf-notes.md 9), 1024 when
# glibc's malloc backs the buffers with huge pages (a chunk's fresh buffers then cost
# little to fault in; +5-7%, perf-notes 16); GPU/TPU: not measured here, sized so a
# chunk's float32 logits stay under 1 GB at vocab 50257.
AUTO_LOSS_CHUNK = {"cpu": 256, "cpu+hugepages": 1024, "gpu": 4096, "tpu": 4096}
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
    # compute choices
    dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False
    attention: str = "explicit"  # explicit | xla | cudnn (ATTENTION)
    # LM loss: -1 = auto (fixed by resolve_auto at the entry points; left open it means
    # full logits), 0 = full logits, N = about N tokens per chunk (fused; the (tokens,
    # vocab) logits never exist at once)
    loss_chunk: int = -1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                "pick dimensions where n_embd / n_head is a whole number"
            )
        if self.activation_function not in ACTIVATIONS:
            raise UserError(
                f"activation_function={self.activation_function!r} is not supported; "
                f"supported: {', '.join(ACTIVATIONS)}"
            )
        if self.head not in HEADS:
            raise UserError(f"model.head={self.head!r}: choose one of {', '.join(HEADS)}")
        if self.dtype not in DTYPES:
            raise UserError(f"model.dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.remat not in REMAT:
            raise UserError(f"model.remat={self.remat!r}: choose one of {', '.join(REMAT)}")
        if self.attention not in ATTENTION:
            raise UserError(
                f"model.attention={self.attention!r}: choose one of {', '.join(ATTENTION)}"
            )
        if self.attention == "cudnn" and self.dtype == "float32":
            raise UserError(
                "model.attention=cudnn needs a 16-bit compute dtype (cuDNN flash attention "
                "has no float32 kernel): set model.dtype=bfloat16, or use model.attention=xla"
            )
        if self.loss_chunk < -1:
            raise UserError(
                f"model.loss_chunk must be -1 (auto), 0 (full logits) or a token count, got "
                f"{self.loss_chunk}"
            )
        if self.head != "lm" and self.num_labels < 1:
            raise UserError(f"model.num_labels must be >= 1, got {self.num_labels}")

    @property
    def loss_chunk_tokens(self) -> int:
        """Tokens per LM-loss chunk; 0 (full logits) while loss_chunk is still auto."""
        return max(self.loss_chunk, 0)

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
    """cfg with its automatic choices fixed for `platform` ("cpu", "gpu", "tpu"); on CPU
    `hugepages` says whether glibc's huge-page malloc backs the buffers (AUTO_LOSS_CHUNK)."""
    if cfg.loss_chunk >= 0:
        return cfg
    key = "cpu+hugepages" if platform == "cpu" and hugepages else platform
    return cfg.replace(loss_chunk=AUTO_LOSS_CHUNK.get(key, AUTO_LOSS_CHUNK["gpu"]))


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


def sum_tokens(x: jax.Array) -> jax.Array:
    """Sum over every axis but the last, as a ones-vector product: XLA's CPU reduction
    over the token axis of a (tokens, features) array ran at under 1 GB/s."""
    x2 = x.reshape(-1, x.shape[-1])
    return jnp.matmul(jnp.ones((1, x2.shape[0]), x.dtype), x2)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm computed in float32 whatever the compute dtype (as a bf16 run needs).

    The backward pass is written out so that the scale and bias gradients (sums over all
    tokens) are ones-vector products: XLA's reductions over the token axis ran at under
    1 GB/s on CPU, about 5 ms per parameter for GPT-2 small.
    """
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + eps)
    xhat = (xf - mean) * rstd
    return (xhat * scale + bias).astype(x.dtype), (xhat, rstd, scale)


def _layer_norm_bwd(eps, res, g):
    xhat, rstd, scale = res
    gf = g.astype(jnp.float32)
    dscale, dbias = sum_tokens(gf * xhat), sum_tokens(gf)
    gs = gf * scale
    dx = rstd * (gs - gs.mean(-1, keepdims=True) - xhat * (gs * xhat).mean(-1, keepdims=True))
    # the output, so its cotangent g, has the dtype of x
    return dx.astype(g.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


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
    """Boolean (B or 1, 1, q, k) mask: causal over slots, and keys that are real tokens.

    Query i sits in slot q_offset + i (the KV cache writes new tokens there).
    """
    q = q_offset + jnp.arange(q_len)
    k = jnp.arange(k_len)
    allowed = (k[None, :] <= q[:, None])[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask.astype(bool)[:, None, None, :]
    return allowed


# ---------------------------------------------------------------- custom-VJP kernels
# docs/perf-notes.md sections 4-5: hand-written backward passes whose matmuls keep plain
# layouts. XLA's own backward of the attention einsums materialised transposes of the
# (B, H, T, T) scores (about 15% of a GPT-2-small step on CPU), and the tied head's
# weight gradient g^T h took a slow x^T g matmul path.


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def attention_core(q, k, v, mask, scale, keep, rate):
    """softmax(q k^T * scale, masked) @ v with an optional attention-dropout keep mask.

    q, k, v: (B, H, T, K); mask: bool, broadcastable to (B, H, T, T); scale: a scalar
    (may be traced, e.g. under scan_layers with scale_attn_by_inverse_layer_idx); keep:
    bool (B, H, T, T) or None; rate: the dropout rate the keep mask was drawn with (a
    static Python float). Returns (B, H, T, K) in q's dtype. Same maths as the explicit
    formula, but the backward pass is written by hand (see _attention_bwd).
    """
    return _attention_fwd(q, k, v, mask, scale, keep, rate)[0]


def _attention_probs(q, k, mask, scale):
    s = jnp.matmul(q, jnp.swapaxes(k, -1, -2)).astype(jnp.float32) * scale
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(s, axis=-1)


def _attention_fwd(q, k, v, mask, scale, keep, rate):
    p = _attention_probs(q, k, mask, scale)
    pd = p if keep is None else jnp.where(keep, p / (1.0 - rate), 0.0)
    out = jnp.matmul(pd.astype(q.dtype), v)
    return out, (q, k, v, p, mask, scale, keep, out)


def _attention_bwd(rate, res, do):
    q, k, v, p, mask, scale, keep, out = res
    pd = p if keep is None else jnp.where(keep, p / (1.0 - rate), 0.0)
    # Every matmul below takes the (T, T) matrices in their stored layout: products that
    # contract their first axis are computed transposed, (K, T) = x^T @ (T, T), with the
    # small operand and result transposed instead (2 transposed copies of a (T, T)
    # matrix per layer otherwise).
    dv = _t(jnp.matmul(_t(do), pd.astype(q.dtype)))
    # sum_s dp * p over the keys equals do . out (out = pd @ v), so the softmax backward
    # needs no reduction over the (T, T) matrix
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    if keep is None:
        # dp - delta as one product, [do, delta] @ [v, -1]^T: fused into the elementwise
        # pass below, the library ran dp = do @ v^T several times slower than alone
        do_aug = jnp.concatenate([do, delta.astype(do.dtype)], -1)
        v_aug = jnp.concatenate([v, -jnp.ones((*v.shape[:-1], 1), v.dtype)], -1)
        dpd = jnp.matmul(do_aug, jnp.swapaxes(v_aug, -1, -2), preferred_element_type=jnp.float32)
    else:
        dp = jnp.matmul(do, jnp.swapaxes(v, -1, -2)).astype(jnp.float32)
        dpd = jnp.where(keep, dp / (1.0 - rate), 0.0) - delta
    ds = p * dpd
    # masked scores are constants: no gradient, even in a fully masked (padding) row,
    # where the softmax is uniform and p alone would not zero them
    ds = jnp.where(mask, ds * scale, 0.0).astype(q.dtype)
    dq = jnp.matmul(ds, k).astype(q.dtype)
    dk = _t(jnp.matmul(_t(q), ds)).astype(k.dtype)
    # no gradient flows to the mask, the scale (a constant of the architecture) or keep
    return dq, dk, dv.astype(v.dtype), None, jnp.zeros_like(scale), None


def _t(x: jax.Array) -> jax.Array:
    """Swap the last two axes (see _attention_bwd). The barrier keeps XLA's algebraic
    simplifier from folding the swap back into the product; XLA's CPU pipeline removes
    it before fusion, so it constrains the dot's form, not what is fused."""
    return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


attention_core.defvjp(_attention_fwd, _attention_bwd)


@jax.custom_vjp
def tied_head(h: jax.Array, w: jax.Array) -> jax.Array:
    """h (N, D) @ w (V, D)^T -> (N, V), with the weight gradient computed as (h^T g)^T.

    dW = g^T h contracts the token axis of both operands, a layout that runs on a slower
    matmul path on CPU; transposing the small h first keeps the vocab axis contiguous.
    """
    return jnp.matmul(h, w.T)


def _head_fwd(h, w):
    return jnp.matmul(h, w.T), (h, w)


def _head_bwd(res, g):
    h, w = res
    # the barriers stop XLA from folding the transposes back into the slow form
    ht = jax.lax.optimization_barrier(h.T)
    dwt = jax.lax.optimization_barrier(jnp.matmul(ht, g))
    return jnp.matmul(g, w).astype(h.dtype), dwt.T.astype(w.dtype)


tied_head.defvjp(_head_fwd, _head_bwd)


@jax.custom_vjp
def linear(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """x (..., n_in) @ w (n_in, n_out) + b (n_out,), with a hand-written backward pass.

    XLA's own backward computed the weight gradient x^T g from a transposed copy of g,
    and fused g's whole producer (the residual stream's gradient chain) into that copy
    (about 30 ms per use for GPT-2 small on CPU). Here the weight gradient contracts the
    token axes of x and g directly, and the bias gradient is a ones-vector product,
    which ran faster than XLA's reduction over the token axis (docs/perf-notes.md 14).
    """
    return _linear_fwd(x, w, b)[0]


def _linear_fwd(x, w, b):
    y = jnp.matmul(x.reshape(-1, x.shape[-1]), w) + b
    return y.reshape(*x.shape[:-1], w.shape[1]), (x, w, b)


def _linear_bwd(res, g):
    x, w, b = res
    x2 = x.reshape(-1, x.shape[-1])
    g2 = g.reshape(-1, g.shape[-1])
    dx = jnp.matmul(g2, w.T)
    dw = jnp.matmul(x2.T, g2)
    db = sum_tokens(g2).astype(b.dtype)
    return dx.reshape(x.shape).astype(x.dtype), dw.astype(w.dtype), db


linear.defvjp(_linear_fwd, _linear_bwd)


def _seq_chunks(x: jax.Array, size: int) -> jax.Array:
    """(B, T, ...) -> (C, B, size, ...): T zero-padded to C * size, chunk axis first.

    Chunking along the sequence keeps the batch axis (the one sharded over the mesh)
    intact inside every chunk.
    """
    b, t = x.shape[:2]
    c = -(-t // size)
    pad = [(0, 0), (0, c * size - t)] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, pad).reshape(b, c, size, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _unchunk(x: jax.Array, t: int) -> jax.Array:
    """The inverse of _seq_chunks: (C, B, size, ...) -> (B, T, ...)."""
    c, b, size = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, c * size, *x.shape[3:])[:, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_nll(h: jax.Array, w: jax.Array, targets: jax.Array, size: int) -> jax.Array:
    """-log softmax(h @ w^T)[target] per token, never holding more than one chunk's logits.

    h (B, T, D), w (V, D) in h's dtype, targets (B, T) int; `size` sequence positions per
    chunk (static). Returns (B, T) float32, equal to the cross-entropy of the full logits.
    The forward pass keeps only h and the per-token logsumexp; the backward pass
    recomputes each chunk's logits and accumulates dh and dW = (h^T (softmax - onehot))^T
    chunk by chunk (the (B * T, V) logits and their gradient are never materialised).
    """
    return _chunked_nll_fwd(h, w, targets, size)[0]


def _chunk_logits(hi, w):
    return jnp.matmul(hi, w.T, preferred_element_type=jnp.float32)  # (B, size, V)


def _chunked_nll_fwd(h, w, targets, size):
    def body(_, xs):
        hi, ti = xs
        logits = _chunk_logits(hi, w)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, ti[..., None], axis=-1)[..., 0]
        return None, (lse - tgt, lse)

    t = h.shape[1]
    _, (nll, lse) = jax.lax.scan(body, None, (_seq_chunks(h, size), _seq_chunks(targets, size)))
    lse = _unchunk(lse, t)
    return _unchunk(nll, t), (h, w, targets, lse)


def _chunked_nll_bwd(size, res, g):
    h, w, targets, lse = res
    v = w.shape[0]

    def body(dwt, xs):
        hi, ti, li, gi = xs  # gi is 0 on padded positions: they add nothing
        logits = _chunk_logits(hi, w)
        p = jnp.exp(logits - li[..., None])
        hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == ti[..., None]
        d = (jnp.where(hit, p - 1.0, p) * gi[..., None]).astype(h.dtype)  # dnll/dlogits
        dh = jnp.matmul(d, w)
        # h^T d keeps the vocab axis contiguous (tied_head's layout argument)
        dwt = dwt + jnp.einsum("btd,btv->dv", hi, d, preferred_element_type=jnp.float32)
        return dwt, dh

    xs = (_seq_chunks(h, size), _seq_chunks(targets, size), _seq_chunks(lse, size),
          _seq_chunks(g.astype(jnp.float32), size))
    dwt, dh = jax.lax.scan(body, jnp.zeros((h.shape[-1], v), jnp.float32), xs)
    return _unchunk(dh, h.shape[1]).astype(h.dtype), dwt.T.astype(w.dtype), None


chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def fused_nll_sum(h: jax.Array, w: jax.Array, targets: jax.Array, weights: jax.Array,
                  size: int) -> jax.Array:
    """sum(weights * nll) of the tied head, chunked, with the gradients made in the forward.

    Same inputs as chunked_nll plus weights (B, T); returns a float32 scalar. Under
    differentiation the forward pass computes, chunk by chunk, the logits, the loss and
    already dh and dW (the upstream gradient of a scalar loss is one number, applied in the
    backward pass), so every chunk's logits are made once, not twice as in chunked_nll.
    Residuals: dh (B, T, D) and dW (V, D) in float32, no logits.
    """
    return jnp.sum(chunked_nll(h, w, targets, size) * weights)


def _fused_fwd(h, w, targets, weights, size):
    v, d = w.shape

    def body(dwt, xs):
        hi, ti, wi = xs
        logits = _chunk_logits(hi, w)
        m = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - m)  # one exp per logit serves the loss and its gradient
        s = jnp.sum(e, axis=-1, keepdims=True)
        tgt = jnp.take_along_axis(logits, ti[..., None], axis=-1)  # a gather, not a pass
        nll = (m + jnp.log(s) - tgt)[..., 0]
        # d nll / d logits times the token weight is e * c - onehot * wi with c = wi / s.
        # The products take e as it is: c scales a row of dh after its product and a row
        # of h before dW's (both small), and the onehot part is a gather here and a
        # scatter after the loop. A pass over the (tokens, V) logits to form the gradient
        # is gone (3% of config A's step; docs/perf-notes.md 17).
        c = wi[..., None] / s
        e = e.astype(h.dtype)
        dh = jnp.matmul(e, w, preferred_element_type=jnp.float32) * c \
            - wi[..., None] * jnp.take(w, ti, axis=0).astype(jnp.float32)
        # h^T e keeps the vocab axis contiguous (tied_head's layout argument)
        dwt = dwt + jnp.einsum("btd,btv->dv", (hi * c).astype(h.dtype), e,
                               preferred_element_type=jnp.float32)
        return dwt, (nll, dh)

    xs = (_seq_chunks(h, size), _seq_chunks(targets, size),
          _seq_chunks(weights.astype(jnp.float32), size))
    dwt, (nll, dh) = jax.lax.scan(body, jnp.zeros((d, v), jnp.float32), xs)
    t = h.shape[1]
    nll = _unchunk(nll, t)
    # the onehot part of dW: minus the weighted h of every token, added at its target's row
    hw = h.astype(jnp.float32) * weights.astype(jnp.float32)[..., None]
    dw = dwt.T.at[targets.reshape(-1)].add(-hw.reshape(-1, d))
    # residuals in the primal dtypes (an empty array carries the weights' dtype)
    res = (nll, _unchunk(dh, t).astype(h.dtype), dw.astype(w.dtype),
           jnp.zeros((0,), weights.dtype))
    return jnp.sum(nll * weights), res


def _fused_bwd(size, res, g):
    nll, dh, dw, wdt = res
    return (g.astype(dh.dtype) * dh, g.astype(dw.dtype) * dw, None, (g * nll).astype(wdt.dtype))


fused_nll_sum.defvjp(_fused_fwd, _fused_bwd)


def has_cudnn() -> bool:
    """Whether JAX sees an NVIDIA GPU (CUDA backend)."""
    return any(d.platform == "gpu" and "cuda" in str(d.client.platform_version).lower()
               for d in jax.devices())


def require_cudnn() -> None:
    """UserError unless JAX sees an NVIDIA GPU (CUDA backend), naming the devices seen."""
    devices = jax.devices()
    if not has_cudnn():
        seen = ", ".join(sorted({f"{d.platform} ({d.device_kind})" for d in devices}))
        raise UserError(
            f"model.attention=cudnn needs an NVIDIA GPU with the CUDA build of jax, but JAX "
            f"sees {len(devices)} device(s): {seen}; use model.attention=xla or explicit "
            "(or install jax[cuda12] on a GPU machine)"
        )


def chunk_positions(tokens: int, shape: tuple[int, ...]) -> int:
    """Sequence positions per LM-loss chunk so that each device holds about `tokens` rows
    of logits (0: no chunking). Under a mesh the batch axis is split by sharding.RULES'
    `batch` rule, so a device holds B / (its data-parallel width) rows of every chunk."""
    if tokens <= 0:
        return 0
    batch, length = shape[0], shape[1]
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        from .sharding import spec_for

        axes = spec_for(("batch",), (batch,), mesh)[0]
        names = () if axes is None else (axes,) if isinstance(axes, str) else axes
        batch //= math.prod(mesh.shape[n] for n in names)
    return min(max(1, tokens // max(batch, 1)), length)


def constrain_batch(x: jax.Array) -> jax.Array:
    """Shard an activation's leading (batch) axis by sharding.RULES' `batch` rule, under a
    mesh only (jax.sharding.use_abstract_mesh / set_mesh; the train and eval steps enter
    one when their inputs live on a mesh). Other axes are left replicated.

    Without it the SPMD partitioner picks layouts for some activations (e.g. the position
    embeddings' gradient) that differ from the batch's and falls back to a full
    rematerialisation (replicate, then re-partition).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    from .sharding import spec_for

    spec = spec_for(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def _unshard_embed(table: jax.Array, row_axis: str) -> jax.Array:
    """An embedding table gathered along `embed` (FSDP's all-gather before use) under a
    mesh; its rows keep their rule. A lookup into a table split along `embed` gives
    activations split along `embed`, which the partitioner cannot turn into the batch
    layout without replicating them first."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return table
    from .sharding import spec_for

    return jax.lax.with_sharding_constraint(table, spec_for((row_axis, None), table.shape, mesh))


def _param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=axes)


_zeros = nnx.initializers.zeros
_ones = nnx.initializers.ones


# ---------------------------------------------------------------- modules


class LayerNorm(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        self.scale = _param(rngs, _ones, (cfg.n_embd,), ("norm",))
        self.bias = _param(rngs, _zeros, (cfg.n_embd,), ("norm",))
        self.eps = cfg.layer_norm_epsilon

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class Attention(nnx.Module):
    """Causal multi-head self-attention with packed q/k/v and an optional KV cache."""

    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        d, h, k = cfg.n_embd, cfg.n_head, cfg.head_dim
        std = cfg.initializer_range
        proj_std = std / math.sqrt(2 * cfg.n_layer)
        self.c_attn_kernel = _param(
            rngs, nnx.initializers.normal(std), (d, 3, h, k), ("embed", "qkv", "heads", "head_dim")
        )
        self.c_attn_bias = _param(rngs, _zeros, (3, h, k), ("qkv", "heads", "head_dim"))
        self.c_proj_kernel = _param(
            rngs, nnx.initializers.normal(proj_std), (h, k, d), ("heads", "head_dim", "embed")
        )
        self.c_proj_bias = _param(rngs, _zeros, (d,), ("norm",))
        self.cfg = cfg

    def __call__(self, x, mask, layer_idx, key=None, cache=None, cache_index=None):
        cfg = self.cfg
        scale = 1.0
        if cfg.scale_attn_weights:
            scale /= math.sqrt(cfg.head_dim)
        if cfg.scale_attn_by_inverse_layer_idx:
            scale = scale / (layer_idx + 1.0)
        if cache is None:
            out = self._attend_no_cache(x, mask, scale, key)
        else:
            out, cache = self._attend_cached(x, mask, scale, key, cache, cache_index)
        return dropout(out, cfg.resid_pdrop, _fold(key, 1)), cache

    def _project_qkv(self, x, merged: bool = False):
        """q, k, v as (B, T, H, K), each a plain (tokens, d) @ (d, H * K) product.

        Written as one einsum into (3, B, H, T, K), XLA computed a transposed product and
        rebuilt a transposed copy of x (with its whole producer fused in) on every layer,
        and in decoding transposed the whole kernel on every token. Training takes one
        product per q/k/v, so a kernel split along `heads` (tensor parallelism) stays split
        the same way in each (d, H * K) view. `merged` (decoding, one device) takes one
        (d, 3 * H * K) view instead: the per-q/k/v slices of the kernel are strided, and
        XLA copied them on every decoded token.
        """
        b, t, d = x.shape
        w = self.c_attn_kernel[...].astype(x.dtype)
        bias = self.c_attn_bias[...].astype(x.dtype)
        heads = w.shape[2:]
        if merged:
            qkv = linear(x, w.reshape(d, -1), bias.reshape(-1)).reshape(b, t, *w.shape[1:])
            return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        return tuple(linear(x, w[:, i].reshape(d, -1), bias[i].reshape(-1)).reshape(b, t, *heads)
                     for i in range(3))

    def _attend_no_cache(self, x, mask, scale, key):
        """Training / evaluation: heads-major (B, H, T, K) layout and attention_core."""
        cfg = self.cfg
        if cfg.attention != "explicit":
            return self._attend_library(x, mask, scale, _fold(key, 0))
        q, k, v = (jnp.swapaxes(y, 1, 2) for y in self._project_qkv(x))  # (B, H, T, K)
        keep, rate = None, 0.0
        akey = _fold(key, 0)
        if akey is not None and cfg.attn_pdrop > 0.0:
            rate = float(cfg.attn_pdrop)
            b, h, t, _ = q.shape
            # the same draw as dropout() on the (B, H, T, T) probabilities
            keep = jax.random.bernoulli(akey, 1.0 - rate, (b, h, t, t))
        out = attention_core(q, k, v, mask, jnp.asarray(scale, jnp.float32), keep, rate)
        return self._project_out(jnp.swapaxes(out, 1, 2))

    def _project_out(self, out):
        """(B, T, H, K) attention output -> (B, T, d): c_proj as one plain product."""
        b, t, h, k = out.shape
        w = self.c_proj_kernel[...].astype(out.dtype).reshape(h * k, -1)
        return linear(out.reshape(b, t, h * k), w, self.c_proj_bias[...].astype(out.dtype))

    def _attend_library(self, x, mask, scale, akey):
        """model.attention xla / cudnn: jax.nn.dot_product_attention in (B, T, N, H).

        `mask` is the same boolean (B or 1, 1, T, T) mask as the explicit path's (causal and
        key padding); masked logits get a large negative value there too, so a fully
        masked (left-padding) query row is a uniform average in both.
        """
        cfg, dt = self.cfg, x.dtype
        if akey is not None and cfg.attn_pdrop > 0.0:
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
        q, k, v = self._project_qkv(x)  # (B, T, N, H), the library's layout
        if impl == "cudnn" and not isinstance(scale, float):
            # cuDNN wants a static scale; a traced one (scan_layers with
            # scale_attn_by_inverse_layer_idx) is folded into q instead
            q, scale = (q * scale).astype(dt), 1.0
        if impl == "cudnn" and mask.shape[0] == 1:
            # no padding: the causal mask type, which never materialises a (T, T) mask
            out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                               implementation=impl)
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                               implementation=impl)
        return self._project_out(out)

    def _attend_cached(self, x, mask, scale, key, cache, cache_index):
        """Decoding: the new tokens' k/v go into the (B, S, H, K) cache at cache_index."""
        cfg, dt = self.cfg, x.dtype
        q, k, v = self._project_qkv(x, merged=True)
        ck, cv = cache
        k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
        scores = jnp.einsum("bqhk,bshk->bhqs", q, k.astype(dt)).astype(jnp.float32) * scale
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = dropout(probs, cfg.attn_pdrop, _fold(key, 0)).astype(dt)
        out = jnp.einsum("bhqs,bshk->bqhk", probs, v.astype(dt))
        return self._project_out(out), (k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        d, f, std = cfg.n_embd, cfg.inner, cfg.initializer_range
        proj_std = std / math.sqrt(2 * cfg.n_layer)
        self.c_fc_kernel = _param(rngs, nnx.initializers.normal(std), (d, f), ("embed", "mlp"))
        self.c_fc_bias = _param(rngs, _zeros, (f,), ("mlp",))
        self.c_proj_kernel = _param(
            rngs, nnx.initializers.normal(proj_std), (f, d), ("mlp", "embed")
        )
        self.c_proj_bias = _param(rngs, _zeros, (d,), ("norm",))
        self.cfg = cfg

    def __call__(self, x, key=None):
        dt = x.dtype
        h = linear(x, self.c_fc_kernel[...].astype(dt), self.c_fc_bias[...].astype(dt))
        h = ACTIVATIONS[self.cfg.activation_function](h)
        h = linear(h, self.c_proj_kernel[...].astype(dt), self.c_proj_bias[...].astype(dt))
        return dropout(h, self.cfg.resid_pdrop, key)


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
        self.kernel = _param(
            rngs,
            nnx.initializers.normal(cfg.initializer_range),
            (cfg.n_embd, cfg.num_labels),
            ("embed", "labels"),
        )

    def __call__(self, h, attention_mask, key=None):
        b = h.shape[0]
        if attention_mask is None:
            pooled = h[:, -1]
        else:
            pooled = h[jnp.arange(b), last_token_index(attention_mask)]
        return pooled.astype(jnp.float32) @ self.kernel[...]


class AttentionPoolHead(nnx.Module):
    """A learned query attends over the final hidden states, then dropout and a classifier.

    Multi-head (n_head heads): each head's query is a parameter, keys and values are
    projections of the hidden states, padding is masked out.
    """

    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        d, h, k, std = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.initializer_range
        normal = nnx.initializers.normal(std)
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


def optax_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Integer-label cross-entropy of float32 logits (optax's, the trainer's reference)."""
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


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
    KV cache for decoding) and `lm_logits` the tied LM head, for generation, scoring,
    embeddings and auxiliary LM losses.
    """

    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        self.cfg = cfg
        std = cfg.initializer_range
        self.wte = _param(
            rngs, nnx.initializers.normal(std), (cfg.vocab_size, cfg.n_embd), ("vocab", "embed")
        )
        self.wpe = _param(
            rngs,
            nnx.initializers.normal(std),
            (cfg.n_positions, cfg.n_embd),
            ("positions", "embed"),
        )
        if cfg.scan_layers:
            self.h = stack_blocks([Block(cfg, rngs) for _ in range(cfg.n_layer)])
        else:
            self.h = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg, rngs)
        if cfg.head == "sequence":
            self.score = SequenceHead(cfg, rngs)
        elif cfg.head == "attention_pool":
            self.pool = AttentionPoolHead(cfg, rngs)

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
        cache: list | None = None,
        cache_index: jax.Array | int | None = None,
    ):
        """Final hidden states (after ln_f) and the updated cache.

        Without a cache, attention_mask is (B, T) over the input. With a cache (a list of
        per-layer (k, v) arrays of shape (B, S, heads, head_dim)), the input is written at
        slot cache_index and attention_mask is (B, S) over all cache slots.
        """
        cfg = self.cfg
        dt = cfg.compute_dtype
        b, t = input_ids.shape
        arange_positions = position_ids is None and attention_mask is None and cache is None
        if position_ids is None:
            if attention_mask is not None and cache is None:
                position_ids = positions_from_mask(attention_mask)
            else:
                start = 0 if cache_index is None else cache_index
                position_ids = jnp.broadcast_to(start + jnp.arange(t), (b, t))
        x = jnp.take(_unshard_embed(self.wte[...], "vocab"), input_ids, axis=0)
        if arange_positions:  # a slice, not a gather: simpler to shard and to differentiate
            x = x + self.wpe[...][:t][None]
        else:
            x = x + jnp.take(_unshard_embed(self.wpe[...], "positions"), position_ids, axis=0)
        x = dropout(x.astype(dt), cfg.embd_pdrop, _fold(dropout_key, 1_000_001))
        x = constrain_batch(x)
        if cache is None:
            mask = attention_mask_bias(t, t, attention_mask)
        else:
            mask = attention_mask_bias(t, cache[0][0].shape[1], attention_mask, cache_index)

        if cfg.scan_layers and cache is None:
            graphdef, stacked = nnx.split(self.h)

            def body(carry, xs):
                state, i = xs
                block = nnx.merge(graphdef, state)
                out, _ = block(carry, mask, i, _fold(dropout_key, i))
                return constrain_batch(out), None

            x, _ = jax.lax.scan(
                _checkpointed(body, cfg.remat), x, (stacked, jnp.arange(cfg.n_layer))
            )
            new_cache = None
        else:
            blocks = unstack_blocks(self.h) if cfg.scan_layers else self.h
            new_cache = [] if cache is not None else None
            for i, block in enumerate(blocks):
                layer_cache = None if cache is None else cache[i]
                if cfg.remat != "none" and cache is None:
                    gd, st = nnx.split(block)

                    def run(st, x, i=i, gd=gd):
                        return nnx.merge(gd, st)(x, mask, i, _fold(dropout_key, i))[0]

                    x = _checkpointed(run, cfg.remat)(st, x)
                else:
                    x, layer_cache = block(
                        x, mask, i, _fold(dropout_key, i), layer_cache, cache_index
                    )
                x = constrain_batch(x)
                if new_cache is not None:
                    new_cache.append(layer_cache)
        return constrain_batch(self.ln_f(x)), new_cache

    def lm_logits(self, h: jax.Array) -> jax.Array:
        """Tied LM head: logits in float32."""
        lead, d = h.shape[:-1], h.shape[-1]
        logits = tied_head(h.reshape(-1, d), self.wte[...].astype(h.dtype))
        return logits.reshape(*lead, -1).astype(jnp.float32)

    def token_nll(self, h: jax.Array, targets: jax.Array) -> jax.Array:
        """Per-token LM cross-entropy (B, T) float32 of hidden states h (B, T, D) against
        targets (B, T). cfg.loss_chunk_tokens 0: through the full float32 logits (lm_logits);
        N > 0: chunked_nll over chunks of about N tokens per device (`chunk_positions`),
        so the (B * T, vocab) logits never exist at once."""
        size = chunk_positions(self.cfg.loss_chunk_tokens, h.shape)
        if size == 0:
            return optax_nll(self.lm_logits(h), targets)
        return chunked_nll(h, self.wte[...].astype(h.dtype), targets, size)

    def lm_loss_sum(self, h: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
        """sum(weights * token_nll(h, targets)), float32 scalar, for training: with
        cfg.loss_chunk_tokens > 0 through fused_nll_sum (gradients made in the forward pass,
        each chunk's logits computed once), else through the full logits."""
        size = chunk_positions(self.cfg.loss_chunk_tokens, h.shape)
        if size == 0:
            return jnp.sum(self.token_nll(h, targets) * weights)
        return fused_nll_sum(h, self.wte[...].astype(h.dtype), targets, weights, size)

    def classify(self, h, attention_mask=None, dropout_key=None) -> jax.Array:
        if self.cfg.head == "sequence":
            return self.score(h, attention_mask)
        if self.cfg.head == "attention_pool":
            return self.pool(h, attention_mask, _fold(dropout_key, 1_000_002))
        raise UserError("this model has an LM head only; train it with model.head=sequence")

    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, dropout_key=None):
        h, _ = self.hidden_states(
            input_ids, attention_mask, position_ids, dropout_key=dropout_key
        )
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
