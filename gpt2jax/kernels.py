"""The train step's custom-VJP kernels, each beside the plain formula it must equal.

Each kernel's hand-written backward pass keeps its matmuls in plain layouts: the ones XLA
chose for the plain formulas were slow on CPU (docs/perf-notes.md). The `NAME_reference`
beside each is the formula, differentiated by jax.grad; tests/test_kernels.py compares the
two, alone and inside the model (which looks up `kernels.NAME` at trace time).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _custom_vjp(fwd, bwd, nondiff_argnums: tuple[int, ...] = ()):
    """Decorator: the function as a jax.custom_vjp with forward pass fwd and backward bwd."""
    def wrap(primal):
        f = jax.custom_vjp(primal, nondiff_argnums=nondiff_argnums)
        f.defvjp(fwd, bwd)
        return f

    return wrap


def sum_tokens(x: jax.Array) -> jax.Array:
    """Sum over every axis but the last, as a ones-vector product: XLA's CPU reduction
    over the token axis of a (tokens, features) array ran at under 1 GB/s."""
    x2 = x.reshape(-1, x.shape[-1])
    return jnp.matmul(jnp.ones((1, x2.shape[0]), x.dtype), x2)[0]


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


@_custom_vjp(_layer_norm_fwd, _layer_norm_bwd, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm in float32 whatever the compute dtype; the scale and bias gradients are
    ones-vector products (sum_tokens)."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def layer_norm_reference(x, scale, bias, eps: float):
    """LayerNorm in float32 as jax.grad sees it: the kernel's forward pass."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _attention_fwd(q, k, v, mask, scale, keep, rate):
    s = jnp.matmul(q, jnp.swapaxes(k, -1, -2)).astype(jnp.float32) * scale
    p = jax.nn.softmax(jnp.where(mask, s, jnp.finfo(jnp.float32).min), axis=-1)
    pd = p if keep is None else jnp.where(keep, p / (1.0 - rate), 0.0)
    out = jnp.matmul(pd.astype(q.dtype), v)
    return out, (q, k, v, p, mask, scale, keep, out)


def _attention_bwd(rate, res, do):
    q, k, v, p, mask, scale, keep, out = res
    pd = p if keep is None else jnp.where(keep, p / (1.0 - rate), 0.0)
    # products that contract a (T, T) matrix's first axis are computed transposed, so
    # no (T, T) matrix is ever copied transposed (_t)
    dv = _t(jnp.matmul(_t(do), pd.astype(q.dtype)))
    # sum_s dp * p equals do . out: the softmax backward needs no (T, T) reduction
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    if keep is None:
        # dp - delta as one product [do, delta] @ [v, -1]^T: dp = do @ v^T alone ran
        # several times slower
        do_aug = jnp.concatenate([do, delta.astype(do.dtype)], -1)
        v_aug = jnp.concatenate([v, -jnp.ones((*v.shape[:-1], 1), v.dtype)], -1)
        dpd = jnp.matmul(do_aug, jnp.swapaxes(v_aug, -1, -2), preferred_element_type=jnp.float32)
    else:
        dp = jnp.matmul(do, jnp.swapaxes(v, -1, -2)).astype(jnp.float32)
        dpd = jnp.where(keep, dp / (1.0 - rate), 0.0) - delta
    ds = p * dpd
    # masked scores are constants, also in a fully masked (uniform) padding row
    ds = jnp.where(mask, ds * scale, 0.0).astype(q.dtype)
    dq = jnp.matmul(ds, k).astype(q.dtype)
    dk = _t(jnp.matmul(_t(q), ds)).astype(k.dtype)
    return dq, dk, dv.astype(v.dtype), None, jnp.zeros_like(scale), None


def _t(x: jax.Array) -> jax.Array:
    """Swap the last two axes behind a barrier, so XLA's simplifier cannot fold the swap
    back into the product (the CPU pipeline drops the barrier before fusion)."""
    return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


@_custom_vjp(_attention_fwd, _attention_bwd, nondiff_argnums=(6,))
def attention_core(q, k, v, mask, scale, keep, rate):
    """softmax(q k^T * scale, masked) @ v with an optional dropout keep mask.

    q, k, v: (B, H, T, K); mask: bool, broadcastable to (B, H, T, T); scale: a scalar (may
    be traced); keep: bool (B, H, T, T) or None, drawn with the static float `rate`.
    """
    return _attention_fwd(q, k, v, mask, scale, keep, rate)[0]


def attention_core_reference(q, k, v, mask, scale, keep, rate):
    """The explicit attention formula (einsums, softmax, dropout keep mask)."""
    s = jnp.einsum("bhqk,bhsk->bhqs", q, k).astype(jnp.float32) * scale
    p = jax.nn.softmax(jnp.where(mask, s, jnp.finfo(jnp.float32).min), axis=-1)
    if keep is not None:
        p = jnp.where(keep, p / (1.0 - rate), 0.0)
    return jnp.einsum("bhqs,bhsk->bhqk", p.astype(q.dtype), v)


def _head_fwd(h, w):
    return jnp.matmul(h, w.T), (h, w)


def _head_bwd(res, g):
    h, w = res
    # the barriers stop XLA from folding the transposes back into the slow form
    ht = jax.lax.optimization_barrier(h.T)
    dwt = jax.lax.optimization_barrier(jnp.matmul(ht, g))
    return jnp.matmul(g, w).astype(h.dtype), dwt.T.astype(w.dtype)


@_custom_vjp(_head_fwd, _head_bwd)
def tied_head(h: jax.Array, w: jax.Array) -> jax.Array:
    """h (N, D) @ w (V, D)^T, the weight gradient as (h^T g)^T: g^T h, contracting both
    token axes, runs on a slower matmul path on CPU."""
    return jnp.matmul(h, w.T)


def tied_head_reference(h, w):
    return jnp.einsum("nd,vd->nv", h, w)


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


@_custom_vjp(_linear_fwd, _linear_bwd)
def linear(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """x (..., n_in) @ w (n_in, n_out) + b. XLA's own weight gradient copied g transposed
    with its whole producer fused in (about 30 ms per use, GPT-2 small on CPU; perf-notes
    section 4); here it contracts the token axes of x and g directly."""
    return _linear_fwd(x, w, b)[0]


def linear_reference(x, w, b):
    return x @ w + b


def _seq_chunks(x: jax.Array, size: int) -> jax.Array:
    """(B, T, ...) -> (C, B, size, ...), T zero-padded to C * size: each chunk keeps the
    whole (sharded) batch axis."""
    b, t = x.shape[:2]
    c = -(-t // size)
    pad = [(0, 0), (0, c * size - t)] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, pad).reshape(b, c, size, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _unchunk(x: jax.Array, t: int) -> jax.Array:
    """The inverse of _seq_chunks: (C, B, size, ...) -> (B, T, ...)."""
    c, b, size = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, c * size, *x.shape[3:])[:, :t]


def _f32_dot(fn, *xs, single: bool = False):
    """fn(*xs, preferred_element_type=float32). With `single` (one chunk, so XLA removes
    the loop) the CPU takes float32 operands: its dot thunk has no bf16 x bf16 = f32
    kernel ("UNIMPLEMENTED: Unsupported element type for DotThunk::Execute")."""
    def f32(*a):
        return fn(*(x.astype(jnp.float32) for x in a))

    if not single or all(x.dtype == jnp.float32 for x in xs):
        return fn(*xs, preferred_element_type=jnp.float32)
    return jax.lax.platform_dependent(
        *xs, cpu=f32, default=lambda *a: fn(*a, preferred_element_type=jnp.float32))


def _chunk_logits(hi, w, single: bool = False):
    return _f32_dot(lambda a, b, **kw: jnp.matmul(a, b.T, **kw), hi, w, single=single)


def _chunk_nll(hi, ti, w, single: bool):
    """A chunk's per-token nll and logsumexp."""
    logits = _chunk_logits(hi, w, single)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, ti[..., None], axis=-1)[..., 0], lse


def _chunked_nll_fwd(h, w, targets, size):
    single = h.shape[1] <= size
    xs = (_seq_chunks(h, size), _seq_chunks(targets, size))
    _, (nll, lse) = jax.lax.scan(lambda _, x: (None, _chunk_nll(*x, w, single)), None, xs)
    return _unchunk(nll, h.shape[1]), (h, w, targets, _unchunk(lse, h.shape[1]))


def _chunked_nll_bwd(size, res, g):
    h, w, targets, lse = res
    v, single = w.shape[0], h.shape[1] <= size

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


@_custom_vjp(_chunked_nll_fwd, _chunked_nll_bwd, nondiff_argnums=(3,))
def chunked_nll(h: jax.Array, w: jax.Array, targets: jax.Array, size: int) -> jax.Array:
    """-log softmax(h @ w^T)[target] per token, (B, T) float32, from h (B, T, D), w (V, D)
    and `size` sequence positions per chunk; no more than one chunk's logits at a time.

    The forward pass keeps h and the per-token logsumexp; the backward pass recomputes
    each chunk's logits and accumulates dh and dW chunk by chunk.
    """
    return _chunked_nll_fwd(h, w, targets, size)[0]


def _fused_fwd(h, w, targets, weights, size):
    (v, d), single = w.shape, h.shape[1] <= size

    def body(dwt, xs):
        hi, ti, wi = xs
        logits = _chunk_logits(hi, w, single)
        m = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - m)  # one exp per logit serves the loss and its gradient
        s = jnp.sum(e, axis=-1, keepdims=True)
        tgt = jnp.take_along_axis(logits, ti[..., None], axis=-1)  # a gather, not a pass
        nll = (m + jnp.log(s) - tgt)[..., 0]
        # the weighted gradient is e * c - onehot * wi with c = wi / s: c scales small
        # operands (dh's rows after, h's rows before dW's product) and the onehot part is
        # a gather here and a scatter after the loop, so no pass forms the (tokens, V)
        # gradient (3% of config A's step; docs/perf-notes.md section 6)
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


@_custom_vjp(_fused_fwd, _fused_bwd, nondiff_argnums=(4,))
def fused_nll_sum(h: jax.Array, w: jax.Array, targets: jax.Array, weights: jax.Array,
                  size: int) -> jax.Array:
    """sum(weights * chunked_nll), a float32 scalar, whose forward pass under
    differentiation already makes dh and dW (residuals, float32, no logits), so each
    chunk's logits are computed once rather than twice."""
    return jnp.sum(chunked_nll(h, w, targets, size) * weights)


def optax_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Integer-label cross-entropy of float32 logits (optax's, the trainer's reference)."""
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def chunked_nll_reference(h: jax.Array, w: jax.Array, targets: jax.Array,
                          size: int) -> jax.Array:
    """chunked_nll in plain JAX: a scan over rematerialised (jax.checkpoint) chunks."""
    single = h.shape[1] <= size
    chunk = jax.checkpoint(lambda hi, ti, w: _chunk_nll(hi, ti, w, single)[0])
    xs = (_seq_chunks(h, size), _seq_chunks(targets, size))
    _, nll = jax.lax.scan(lambda c, x: (c, chunk(*x, w)), None, xs)
    return _unchunk(nll, h.shape[1])


def fused_nll_sum_reference(h, w, targets, weights, size: int) -> jax.Array:
    """fused_nll_sum in plain JAX: the weighted sum of chunked_nll_reference."""
    return jnp.sum(chunked_nll_reference(h, w, targets, size) * weights)


# the kernels the model looks up here at trace time; tests swap in each NAME_reference
KERNELS = ("attention_core", "tied_head", "linear", "layer_norm", "chunked_nll",
           "fused_nll_sum")


def pick(name: str, choice: str):
    """kernels.NAME for model.kernels custom (or a still open auto), NAME_reference for
    plain; looked up at call time, so a test's swap is seen."""
    return globals()[f"{name}_reference" if choice == "plain" else name]
