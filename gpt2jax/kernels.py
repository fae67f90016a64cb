"""The train step's custom-VJP kernels, each beside the plain formula it must equal.

Each kernel has a hand-written backward pass whose matmuls keep plain layouts (the
layouts XLA chose for the plain formulas were slow on CPU: docs/perf-notes.md). The
`*_reference` function after each is the formula it implements, differentiated by
jax.grad; tests/test_kernels.py checks values and gradients against it, alone and inside
the whole model (the model calls `kernels.NAME` at trace time, so a test can swap in the
references).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


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


def layer_norm_reference(x, scale, bias, eps: float):
    """LayerNorm in float32 as jax.grad sees it."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


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


def attention_core_reference(q, k, v, mask, scale, keep, rate):
    """The explicit attention formula (einsums, softmax, dropout keep mask)."""
    s = jnp.einsum("bhqk,bhsk->bhqs", q, k).astype(jnp.float32) * scale
    p = jax.nn.softmax(jnp.where(mask, s, jnp.finfo(jnp.float32).min), axis=-1)
    if keep is not None:
        p = jnp.where(keep, p / (1.0 - rate), 0.0)
    return jnp.einsum("bhqs,bhsk->bhqk", p.astype(q.dtype), v)


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


def tied_head_reference(h, w):
    return jnp.einsum("nd,vd->nv", h, w)


@jax.custom_vjp
def linear(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """x (..., n_in) @ w (n_in, n_out) + b (n_out,), with a hand-written backward pass.

    XLA's own backward computed the weight gradient x^T g from a transposed copy of g,
    and fused g's whole producer (the residual stream's gradient chain) into that copy
    (about 30 ms per use for GPT-2 small on CPU). Here the weight gradient contracts the
    token axes of x and g directly, and the bias gradient is a ones-vector product,
    which ran faster than XLA's reduction over the token axis (docs/perf-notes.md section 4).
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


def linear_reference(x, w, b):
    return x @ w + b


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


def _f32_dot(fn, *xs, single: bool = False):
    """fn(*xs, preferred_element_type=float32): a product of 16-bit operands accumulated
    in float32. With `single` (a loss that fits one chunk, so XLA removes the loop) the
    CPU takes float32 operands instead: its dot thunk has no bf16 x bf16 = f32 kernel
    ("UNIMPLEMENTED: Unsupported element type for DotThunk::Execute"). Other platforms,
    and compiles for them from a CPU host, keep the 16-bit operands."""
    def f32(*a):
        return fn(*(x.astype(jnp.float32) for x in a))

    if not single or all(x.dtype == jnp.float32 for x in xs):
        return fn(*xs, preferred_element_type=jnp.float32)
    return jax.lax.platform_dependent(
        *xs, cpu=f32, default=lambda *a: fn(*a, preferred_element_type=jnp.float32))


def _chunk_logits(hi, w, single: bool = False):
    return _f32_dot(lambda a, b, **kw: jnp.matmul(a, b.T, **kw), hi, w, single=single)


def _single(h, size: int) -> bool:
    """Whether the sequence fits one chunk (see _f32_dot)."""
    return h.shape[1] <= size


def _chunked_nll_fwd(h, w, targets, size):
    def body(_, xs):
        hi, ti = xs
        logits = _chunk_logits(hi, w, _single(h, size))
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, ti[..., None], axis=-1)[..., 0]
        return None, (lse - tgt, lse)

    t = h.shape[1]
    _, (nll, lse) = jax.lax.scan(body, None, (_seq_chunks(h, size), _seq_chunks(targets, size)))
    lse = _unchunk(lse, t)
    return _unchunk(nll, t), (h, w, targets, lse)


def _chunked_nll_bwd(size, res, g):
    h, w, targets, lse = res
    v, single = w.shape[0], _single(h, size)

    def body(dwt, xs):
        hi, ti, li, gi = xs  # gi is 0 on padded positions: they add nothing
        logits = _chunk_logits(hi, w, single)
        p = jnp.exp(logits - li[..., None])
        hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == ti[..., None]
        d = (jnp.where(hit, p - 1.0, p) * gi[..., None]).astype(h.dtype)  # dnll/dlogits
        dh = jnp.matmul(d, w)
        # h^T d keeps the vocab axis contiguous (tied_head's layout argument)
        dwt = dwt + _f32_dot(functools.partial(jnp.einsum, "btd,btv->dv"), hi, d,
                             single=single)
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
    (v, d), single = w.shape, _single(h, size)

    def body(dwt, xs):
        hi, ti, wi = xs
        logits = _chunk_logits(hi, w, single)
        m = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - m)  # one exp per logit serves the loss and its gradient
        s = jnp.sum(e, axis=-1, keepdims=True)
        tgt = jnp.take_along_axis(logits, ti[..., None], axis=-1)  # a gather, not a pass
        nll = (m + jnp.log(s) - tgt)[..., 0]
        # d nll / d logits times the token weight is e * c - onehot * wi with c = wi / s.
        # The products take e as it is: c scales a row of dh after its product and a row
        # of h before dW's (both small), and the onehot part is a gather here and a
        # scatter after the loop. A pass over the (tokens, V) logits to form the gradient
        # is gone (3% of config A's step; docs/perf-notes.md section 6).
        c = wi[..., None] / s
        e = e.astype(h.dtype)
        dh = _f32_dot(jnp.matmul, e, w, single=single) * c \
            - wi[..., None] * jnp.take(w, ti, axis=0).astype(jnp.float32)
        # h^T e keeps the vocab axis contiguous (tied_head's layout argument)
        dwt = dwt + _f32_dot(functools.partial(jnp.einsum, "btd,btv->dv"),
                             (hi * c).astype(h.dtype), e, single=single)
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


def optax_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Integer-label cross-entropy of float32 logits (optax's, the trainer's reference)."""
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def chunked_nll_reference(h: jax.Array, w: jax.Array, targets: jax.Array,
                          size: int) -> jax.Array:
    """chunked_nll in plain JAX: a scan over the chunks, each chunk rematerialised
    (jax.checkpoint) so that jax.grad keeps no logits either; XLA differentiates it."""

    @jax.checkpoint
    def chunk(hi, ti, w):
        logits = _chunk_logits(hi, w, _single(h, size))
        tgt = jnp.take_along_axis(logits, ti[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - tgt

    xs = (_seq_chunks(h, size), _seq_chunks(targets, size))
    _, nll = jax.lax.scan(lambda c, x: (c, chunk(*x, w)), None, xs)
    return _unchunk(nll, h.shape[1])


def fused_nll_sum_reference(h, w, targets, weights, size: int) -> jax.Array:
    """fused_nll_sum in plain JAX: the weighted sum of chunked_nll_reference."""
    return jnp.sum(chunked_nll_reference(h, w, targets, size) * weights)


# the kernels the model calls through this module (kernels.NAME at trace time), each with
# a NAME_reference beside it: tests swap one for the other
KERNELS = ("attention_core", "tied_head", "linear", "layer_norm", "chunked_nll",
           "fused_nll_sum")


def pick(name: str, choice: str):
    """The kernel `name` for model.kernels=`choice`: kernels.NAME for "custom" (and for a
    still unresolved "auto"), the plain formula kernels.NAME_reference for "plain".
    Looked up at trace time, so a test that swaps kernels.NAME sees its swap."""
    return globals()[f"{name}_reference" if choice == "plain" else name]

