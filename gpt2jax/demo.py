"""The embedded demo: train on the GCIDE dictionary, evaluate, define held-out words, export.

Offline and small enough for 2 CPU cores; `make demo` runs it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

NO_REPEAT_NGRAM = 3
REPETITION_PENALTY = 1.2
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def run_demo(config: str | Path = DEMO_CONFIG, overrides: list[str] = (), words: int = 6) -> dict:
    """Train (or resume) the demo run, then print definitions for held-out words."""
    from .batches import split_records
    from .config import load_config
    from .data import load_records
    from .generate import generate
    from .hf import export_hf
    from .run import load_run
    from .tasks import Templates, render
    from .train import train

    t0 = time.time()
    cfg = load_config(config, list(overrides))
    print(f"gpt2jax demo: trains a {cfg.model.n_layer or 12}-layer GPT-2 from scratch on the "
          f"GCIDE dictionary (word -> definition, {cfg.train.steps or 'one epoch of'} steps; "
          "a few minutes on 2 CPU cores), then defines held-out words and exports it for "
          "transformers", file=sys.stderr, flush=True)
    summary = train(cfg)
    run = Path(cfg.train.run_dir)
    model, tokenizer, _ = load_run(run)
    # the validation split holds words the model never trained on
    records = load_records(cfg.data.train, text_unit=cfg.data.text_unit, limit=cfg.data.limit)
    _, held_out = split_records(records.to_list(), cfg.data.validation_fraction, cfg.train.seed)
    picks = held_out[:: max(1, len(held_out) // words)][:words]
    templates = Templates.from_data(cfg.data)  # prompts rendered as in training
    prompts = [render(cfg.data.task, r, templates=templates)[0] for r in picks]
    # A model trained for minutes loops ("of the genus of the genus"): a banned repeated
    # 3-gram breaks the loop, and a mild penalty (1.3 broke words) stops it rambling on.
    samples = generate(model, tokenizer, prompts, greedy=True, max_new_tokens=24,
                       stop=["\n"], no_repeat_ngram=NO_REPEAT_NGRAM,
                       repetition_penalty=REPETITION_PENALTY)
    out = export_hf(model, run / "hf", tokenizer, overwrite=True)
    val = summary.get("validation") or {}
    print(f"\nvalidation perplexity after {summary['final_step']} steps: "
          f"{val.get('perplexity', float('nan')):.1f}")
    print(f"\nheld-out words (greedy, no repeated {NO_REPEAT_NGRAM}-gram, repetition penalty "
          f"{REPETITION_PENALTY}):")
    for r, s in zip(picks, samples):
        print(f"  {r['word']}:{s.completion}")
        print(f"      GCIDE: {r['definition'][:100]}")
    print(f"\ntransformers export: {out}")
    print(f"loss plot:           {run / 'loss.png'}")
    print(f"tensorboard:         tensorboard --logdir {run / 'tensorboard'}")
    print(f"\ndemo done in {time.time() - t0:.0f} s: run directory {run}, transformers "
          f"export {out}")
    sys.stdout.flush()
    return {**summary, "export": str(out),
            "definitions": [{"word": r["word"], "generated": s.completion,
                             "reference": r["definition"]} for r, s in zip(picks, samples)]}
