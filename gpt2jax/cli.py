"""gpt2jax: Train, fine-tune, evaluate and export GPT-2 in JAX (`gpt2jax COMMAND --help`).

The command line parses, calls the Python API and prints; nothing else lives here.

Every command takes --json (one JSON object on stdout). Bad input ends with exit status 2
and a last stderr line `gpt2jax: error: ...`; --debug shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from . import malloc
from .config import ATTENTION, KERNELS, LORA_TARGETS
from .errors import Preempted, UserError

Arg = Callable[[argparse.ArgumentParser], object]  # adds one argument (or a group) to a parser
COMMANDS: list[Callable] = []  # each adds one subcommand; filled by @_command, in file order


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors follow our one-line format
        self.print_usage(sys.stderr)
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _emit(result: dict, as_json: bool, text: Callable[[dict], str] | None = None) -> None:
    if as_json:
        from .tracking import print_line
        print_line(json.dumps(result, ensure_ascii=False))
    elif text is not None:
        print(text(result))


def _step(value: str) -> int | str | None:
    """A --step value; None is the latest checkpoint."""
    if value in ("best", "latest"):
        return None if value == "latest" else value
    try:
        return int(value)
    except ValueError:
        raise UserError(f"--step must be a number, 'best' or 'latest', got {value!r}") from None


def _arg(*flags: str, **kw) -> Arg:
    """One `add_argument` call, as an entry of a command's `args`."""
    return lambda p: p.add_argument(*flags, **kw)


CONFIG = [_arg("config", help="YAML config (see configs/)")]
MODEL = [_arg("--model", required=True, metavar="SRC", help="HF directory, hub name, gpt2jax "
              "run or checkpoint (hf:/run: to force)"),
         _arg("--step", type=_step, default=None,
              help="for a run: a checkpoint step, 'best' or 'latest' (default)")]


def _command(name: str, *, args: Sequence[Arg] = (), text: Callable[[dict], str] | None = None,
             json_help: str = "print the result as one JSON line", **kw) -> Callable:
    """Register the decorated `func(args)` as subcommand `name` with the arguments `args`
    and --json; `kw` goes to `add_parser`.

    `func` returns a result dict, printed by `text` (or as JSON with --json), or the exit
    status of a command that printed its own output.
    """
    def register(func: Callable) -> Callable:
        def add(sub) -> None:
            p = sub.add_parser(name, **kw)
            p.set_defaults(func=func, text=text)
            for add_arg in args:
                add_arg(p)
            p.add_argument("--json", action="store_true", help=json_help)

        COMMANDS.append(add)
        return func

    return register


def _load(src: str, step):
    """(model, tokenizer, Source) of a --model SRC and its --step."""
    from .run import load_model

    return load_model(src, step)


def _pick(args, *names: str) -> dict:
    """Options passed on unchanged, as keyword arguments of the same names."""
    return {name: getattr(args, name) for name in names}


def _log(message: str) -> None:
    print(f"gpt2jax: {message}", file=sys.stderr, flush=True)


def _train_text(s: dict) -> str:
    lines = [f"run: {s['run_dir']}  steps {s['start_step']} -> {s['final_step']}  "
             f"({s['wall_seconds']} s, {s['params']:,} parameters, mesh {s['mesh']})"]
    if s.get("train_loss") is not None:
        lines.append(f"train loss: {s['train_loss']:.4f}")
    if s.get("validation"):
        lines.append("validation: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float)
                                                 else f"{k} {v}"
                                                 for k, v in s["validation"].items()
                                                 if k != "confusion_matrix"))
    stop = s.get("stopped") or {}
    if stop.get("reason") == "early_stop":
        lines.append(f"stopped early: validation {stop['metric']} did not improve by more than "
                     f"{stop['min_delta']:g} in {stop['patience']} evaluations; best "
                     f"{stop['best_value']:.4g} at step {stop['best_step']} (--step best)")
    d = s.get("data") or {}
    if "bytes_per_token" in d:
        lines.append(f"data: {d.get('documents')} training records, "
                     f"{d['bytes_per_token']:.3f} bytes/token"
                     + (" (tokens from the cache)" if d.get("cached") else ""))
    return "\n".join(lines)


@_command("train", args=CONFIG, text=_train_text, json_help="print a JSON summary at the end",
          help="train or fine-tune (resumes the run in train.run_dir)",
          description="gpt2jax train CONFIG [--section.key=value ...]")
def _cmd_train(args) -> dict:
    from .config import load_config
    from .train import train

    return train(load_config(args.config, args.overrides))


def _prepare_text(r: dict) -> str:
    unit = "examples" if "train_examples" in r else "blocks"
    lines = [f"data: {r['train']}  ({r['documents']} training records, "
             f"{r['bytes_per_token']:.3f} bytes/token, "
             + ("from the cache" if r["cached"] else f"tokenized in {r['seconds']} s") + ")",
             f"train {unit}: {r[f'train_{unit}']}  validation {unit}: "
             f"{r[f'validation_{unit}']}"]
    if "train_tokens" in r:
        lines.append(f"train tokens: {r['train_tokens']}  validation split: "
                     f"{r['validation_split']}")
    if r["labels"]:
        lines.append(f"labels: {', '.join(r['labels'])}")
    lines.append(f"cache: {r['cache_dir']}")
    return "\n".join(lines)


@_command("prepare", args=CONFIG, text=_prepare_text,
          help="tokenize a config's data into the cache (no training)",
          description="gpt2jax prepare CONFIG [--section.key=value ...]: load, tokenize and "
                      "cache data.train / data.validation exactly as `gpt2jax train` would, "
                      "e.g. once before a multi-host job, and report what the run will see")
def _cmd_prepare(args) -> dict:
    import time

    from .batches import prepare
    from .config import load_config
    from .data import cache_dir
    from .run import tokenizer_for

    cfg = load_config(args.config, args.overrides)
    tokenizer = tokenizer_for(cfg)
    t0 = time.perf_counter()
    p = prepare(cfg.data, tokenizer, seq_len=cfg.train.seq_len, seed=cfg.train.seed,
                eos=tokenizer.eos_token_id)
    unit = "examples" if cfg.data.task == "classification" else "blocks"
    return {"train": cfg.data.train, **p.stats, f"train_{unit}": len(p.train),
            f"validation_{unit}": len(p.validation) if p.validation is not None else 0,
            "labels": list(p.labels), "seconds": round(time.perf_counter() - t0, 2),
            "cache_dir": "off" if cfg.data.cache_dir == "off" else str(cache_dir(cfg.data))}


@_command("demo", args=[_arg("--config", default=None, help="default: configs/demo.yaml")],
          help="train the embedded GCIDE dictionary demo, offline",
          description="Train a small GPT-2 from scratch on the GCIDE dictionary (word -> "
                      "definition), print definitions of held-out words and export the model. "
                      "Any --section.key=value overrides the config, e.g. --train.steps=50.")
def _cmd_demo(args) -> dict:
    from .demo import DEMO_CONFIG, run_demo

    return run_demo(args.config or DEMO_CONFIG, args.overrides)  # the demo prints its own text


@_command("compile", args=[
    *CONFIG,
    _arg("--topology", required=True,
         help="Cloud TPU accelerator type (v5litepod-16, v5e-8, v4-32, v5p-8, v6e-256) or "
              "libtpu's form (v5e:4x4, v4:2x2x2)"),
    _arg("--slices", type=int, default=1, help="multi-slice: number of slices"),
    _arg("--save", metavar="FILE", default=None,
         help="serialize the compiled train step (with the versions it needs)"),
    _arg("--no-eval", action="store_true",
         help="compile the train step only (the eval step takes a quarter more time)"),
], help="compile the train step for a TPU topology, on any machine: memory per chip, FLOPs, "
        "collectives",
   description="gpt2jax compile CONFIG --topology NAME [--section.key=value ...]")
def _cmd_compile(args) -> int:
    from .compile import compile_config, format_report
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    result = compile_config(cfg, args.topology, args.slices, args.save,
                            evaluate=not args.no_eval)
    _emit(result, args.json, format_report)
    return 0 if result["fits"] else 1  # "does not fit" is a result, not an error


@_command("export", args=[
    *MODEL,
    _arg("--out", required=True, help="output directory"),
    _arg("--overwrite", action="store_true", help="replace a non-empty --out"),
    _arg("--backbone-only", action="store_true",
         help="attention_pool head: export the backbone as GPT2LMHeadModel"),
    _arg("--adapter", action="store_true",
         help="a LoRA run: write a PEFT adapter directory instead of merging the adapters "
              "into the weights"),
], text=lambda r: f"exported {r['source']} to {r['out']}",
   help="write a transformers directory (config, safetensors, tokenizer)")
def _cmd_export(args) -> dict:
    from .hf import export_adapter, export_hf

    model, tok, source = _load(args.model, args.step)
    if args.adapter:
        groups, base = _lora_origin(source)
        out = export_adapter(model, args.out, groups, base, tok, overwrite=args.overwrite)
    else:
        out = export_hf(model, args.out, tok, overwrite=args.overwrite,
                        backbone_only=args.backbone_only)
    return {"out": str(out), "source": source.describe(), "head": model.cfg.head}


def _lora_origin(source) -> tuple[list[str], str]:
    """(model.lora.train groups, base model) of the run a LoRA model came from."""
    from .config import read_run_config

    if source.kind not in ("run", "checkpoint"):
        raise UserError(f"--adapter exports a gpt2jax LoRA run; {source.describe()} is not one")
    m = read_run_config(source.path).model
    base = m.init.removeprefix("hf:") if m.init != "scratch" else ""
    return (list(m.lora.train) if m.lora else []), base


def _eval_text(r: dict) -> str:
    if r["task"] == "dictionary_reverse":
        skipped = f"; {r['skipped']} skipped, prompt too long" if r["skipped"] else ""
        return (f"exact match {r['exact_match']:.4f}  ({r['correct']} of {r['examples']}"
                f"{skipped})\n"
                + "\n".join(f"  {s['word']!r} -> {s['generated']!r}" for s in r["samples"]))
    if r["task"] == "lm":
        return (f"loss {r['loss']:.4f}  perplexity {r['perplexity']:.3f}  "
                f"tokens {r['tokens']}  bytes/token {r['bytes_per_token']:.3f}")
    lines = [f"accuracy {r['accuracy']:.4f}  macro_f1 {r['macro_f1']:.4f}  "
             f"examples {r['examples']}", "label  precision  recall  f1  support"]
    for name, m in r["per_class"].items():
        lines.append(f"{name}  {m['precision']:.4f}  {m['recall']:.4f}  {m['f1']:.4f}  "
                     f"{m['support']}")
    lines.append(f"confusion matrix (rows true, columns predicted): {r['confusion_matrix']}")
    return "\n".join(lines)


@_command("eval", args=[
    *MODEL,
    _arg("--data", required=True, help="a .txt/.jsonl/.json/.csv/.tsv/.parquet file, a folder "
         "of them, or hub:ORG/NAME[:CONFIG][@SPLIT]"),
    _arg("--task", choices=("lm", "classification", "dictionary_reverse"), default=None,
         help="default: classification for a classification head, else lm; "
              "dictionary_reverse: exact match of the greedily generated word (records with "
              "word, definition; gcide for the GCIDE dictionary)"),
    _arg("--split", default=None, help="split of a hub dataset or a folder"),
    _arg("--text-column", default="text"),
    _arg("--label-column", default="label"),
    _arg("--text-unit", choices=("document", "line", "paragraph"), default="document",
         help=".txt files: a whole file, each line, or each paragraph is a record"),
    _arg("--batch-size", type=int, default=8),
    _arg("--limit", type=int, default=0, metavar="N",
         help="evaluate the first N records only (default 0: all)"),
    _arg("--seq-len", type=int, default=None,
         help="window / truncation length (default: the model's n_positions)"),
    _arg("--stride", type=int, default=None,
         help="lm: how far windows advance over long documents (default seq-len/2)"),
    _arg("--predictions", default=None, metavar="FILE.jsonl",
         help="classification: write one JSON line per example"),
    _arg("--prompt-template", default="",
         help="dictionary_reverse: the prompt, e.g. '{definition} =>' (default: the run's own "
              "data.prompt_template, else the task's)"),
    _arg("--target-template", default="",
         help="dictionary_reverse: the target, e.g. ' {word}' (same defaults)"),
], text=_eval_text, help="perplexity (lm) or classification metrics on a dataset")
def _cmd_eval(args) -> dict:
    from .evaluate import evaluate_data

    model, tok, source = _load(args.model, args.step)
    templates = None
    if args.task == "dictionary_reverse":
        from .evaluate import run_templates
        from .tasks import Templates

        # the run's own templates when it trained this task; the flags override them
        own = source.kind in ("run", "checkpoint") and run_templates(source.path, args.task)
        base = own or Templates()
        templates = Templates(args.prompt_template or base.prompt,
                              args.target_template or base.target, base.example)
    result = evaluate_data(model, tok, args.data, templates=templates, **_pick(
        args, "task", "text_column", "label_column", "split", "text_unit", "batch_size",
        "seq_len", "stride", "predictions", "limit"))
    return {"model": source.describe(), **result}


@_command("score", args=[
    *MODEL,
    _arg("--prompt", required=True,
         help="context, tokenized as is; empty: the answer follows one <|endoftext|>"),
    _arg("--answer", required=True, help="the text whose probability is scored"),
], text=lambda r: (f"logprob {r['logprob']:.6f}  probability {r['probability']:.6g}  "
                   f"answer_tokens {r['answer_tokens']}"),
   help="log-probability of an answer given a prompt")
def _cmd_score(args) -> dict:
    from .evaluate import score

    model, tok, source = _load(args.model, args.step)
    return {"model": source.describe(), **score(model, tok, args.prompt, args.answer)}


def _sampling_args(greedy: bool) -> list[Arg]:
    """How tokens are picked (generate.Sampling), the same flags wherever gpt2jax decodes;
    `greedy` is the command's default."""
    return [
        _arg("--sample", dest="greedy", action="store_false",
             help="sample with the options below instead of taking the most likely token")
        if greedy else
        _arg("--greedy", action="store_true", help="always take the most likely token"),
        _arg("--temperature", type=float, default=1.0),
        _arg("--top-k", type=int, default=0, help="0: off"),
        _arg("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]; 1: off"),
        _arg("--repetition-penalty", type=float, default=1.0, help="1: off (HF definition)"),
        _arg("--no-repeat-ngram", type=int, default=0, metavar="N",
             help="never repeat an N-gram of the prompt or the output (HF's "
                  "no_repeat_ngram_size); 0: off"),
        _arg("--seed", type=int, default=0),
    ]


def _sampling(args):
    from .generate import Sampling

    # validated here, to fail before loading a model
    return Sampling(args.greedy, args.temperature, args.top_k, args.top_p,
                    args.repetition_penalty, args.no_repeat_ngram).validate()


def _prompt_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text to continue")
    src.add_argument("--prompts-file", metavar="F",
                     help="one prompt per line (blank lines skipped)")


@_command("generate", args=[
    *MODEL,
    _prompt_source,
    *_sampling_args(greedy=False),
    _arg("--max-new-tokens", type=int, default=64),
    _arg("--stop", nargs="+", default=[], metavar="S", help="stop at these strings"),
    _arg("--num-samples", type=int, default=1, help="continuations per prompt"),
    _arg("--batch-size", type=int, default=16, help="rows decoded together (--json)"),
    _arg("--weights-dtype", choices=("float32", "bfloat16"), default=None,
         help="cast the weights for decoding (default: as stored)"),
], help="continue prompts (KV-cache decoding, streamed)",
   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
def _cmd_generate(args) -> dict | int:
    import time
    from dataclasses import asdict

    from .generate import Generator

    if args.prompts_file is not None:
        try:
            lines = open(args.prompts_file, encoding="utf-8").read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompts-file {args.prompts_file}: {e}") from e
        prompts = [ln for ln in lines if ln.strip()]
        if not prompts:
            raise UserError(f"--prompts-file {args.prompts_file} has no non-blank line")
    else:
        prompts = [args.prompt]
    # before loading the model, which can take a while
    if not all(prompts):
        raise UserError("--prompt is empty; give some text to continue")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling = _sampling(args)
    model, tok, _ = _load(args.model, args.step)
    gen = Generator(model, tok, weights_dtype=args.weights_dtype)
    opts = dict(sampling=sampling, **_pick(args, "max_new_tokens", "stop", "seed",
                                           "num_samples", "batch_size"))
    if args.json:
        samples = gen.generate(prompts, **opts)
        return {"samples": [asdict(s) for s in samples],
                "first_token_s": gen.timing.first_token_s,
                "decode_tokens_per_s": gen.timing.decode_tokens_per_s}
    many = len(prompts) * args.num_samples > 1

    def start(p: int, s: int, prompt: str) -> None:
        if many:
            gap = "" if (p, s) == (0, 0) else "\n"  # end the previous row's line
            print(f"{gap}--- prompt {p}, sample {s} ---")
        print(prompt, end="", flush=True)

    t0 = time.perf_counter()
    samples = gen.generate(prompts, on_start=start,
                           on_text=lambda p, s, delta: print(delta, end="", flush=True), **opts)
    seconds = time.perf_counter() - t0
    print(flush=True)
    n = sum(len(s.token_ids) for s in samples)
    t = gen.timing
    rate = "" if t.decode_tokens_per_s is None else f", then {t.decode_tokens_per_s:.1f} tokens/s"
    print(f"[{n} tokens in {seconds:.2f} s: first token after {t.first_token_s:.2f} s{rate}; "
          f"finish: {', '.join(s.finish_reason for s in samples)}]", file=sys.stderr)
    return 0


def _diff_text(r: dict) -> str:
    from .analysis import format_diff

    return (f"a: {r['a']}\nb: {r['b']}\n" + format_diff(r)
            + (f"\nplot: {r['plot']}" if r.get("plot") else ""))


@_command("diff", args=[
    _arg("--a", required=True, metavar="SRC", help="first model (e.g. the base)"),
    _arg("--b", required=True, metavar="SRC", help="second model (e.g. fine-tuned)"),
    _arg("--step-a", type=_step, default=None, help="checkpoint step of a run --a"),
    _arg("--step-b", type=_step, default=None, help="checkpoint step of a run --b"),
    _arg("--plot", metavar="FILE.png", default=None, help="per-layer heatmap"),
    _arg("--plot-metric", default="relative_l2",
         help="statistic coloured in --plot (default relative_l2)"),
], text=_diff_text, help="how far the weights moved between two models")
def _cmd_diff(args) -> dict:
    from .analysis import plot_diff, weight_diff

    model_a, _, src_a = _load(args.a, args.step_a)
    model_b, _, src_b = _load(args.b, args.step_b)
    result = {"a": src_a.describe(), "b": src_b.describe(), **weight_diff(model_a, model_b)}
    if args.plot:
        result["plot"] = str(plot_diff(result, args.plot, args.plot_metric))
    return result


def _similarity_text(r: dict) -> str:
    lines = [f"mean cosine similarity {r['mean_cosine_similarity']:.4f}  "
             f"distance {r['mean_cosine_distance']:.4f}  ({r['n']} words; {r['degenerate']} "
             "degenerate: a repeated 3-word sequence)"]
    for ex in r["examples"][:10]:
        lines.append(f"  {ex['cosine']:.3f}  {ex['word']}: {ex['generated']!r}  "
                     f"(reference: {ex['reference']!r})")
    return "\n".join(lines)


@_command("similarity", args=[
    *MODEL,
    _arg("--data", required=True,
         help="records with a word and a definition column (file, folder, hub:ORG/NAME, or "
              "gcide)"),
    _arg("--split", default=None, help="split of a hub dataset or a folder"),
    _arg("--embed-model", default=None, metavar="SRC_OR_NAME",
         help="embedding model: a gpt2jax/HF source (mean-pooled hidden states), "
              "all-MiniLM-L6-v2 or st:DIR (sentence-transformers); default --model"),
    _arg("--word-column", default="word"),
    _arg("--definition-column", default="definition"),
    _arg("--prompt-template", default="{word}: {definition}",
         help="record format; the prompt is the part before {definition}"),
    _arg("--limit", type=int, default=None, help="first N records only"),
    _arg("--max-new-tokens", type=int, default=48),
    *_sampling_args(greedy=True),
], text=_similarity_text,
   help="generate definitions for words, compare them to the references")
def _cmd_similarity(args) -> dict:
    from .analysis import similarity
    from .data import load_records

    sampling = _sampling(args)
    records = load_records(args.data, split=args.split, limit=args.limit or 0)
    model, tok, source = _load(args.model, args.step)
    result = similarity(model, tok, records, sampling=sampling, **_pick(
        args, "embed_model", "word_column", "definition_column", "prompt_template", "limit",
        "max_new_tokens", "seed"))
    return {"model": source.describe(), **result}


@_command("bench", args=[
    _arg("--preset", choices=("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"), default=None,
         help="model shape (default: 4 layers, n_embd 256, 4 heads)"),
    *[_arg(f"--{dim}", type=int, default=None, help="override the shape")
      for dim in ("n-layer", "n-embd", "n-head", "vocab-size", "n-positions")],
    _arg("--batch-size", type=int, default=8),
    _arg("--seq-len", type=int, default=256),
    _arg("--dtype", choices=("float32", "bfloat16"), default="float32",
         help="compute dtype (weights and AdamW stay float32)"),
    _arg("--remat", choices=("none", "full", "dots"), default="none"),
    _arg("--scan-layers", action="store_true", help="scan over stacked layers"),
    _arg("--attention", choices=ATTENTION, default="explicit",
         help="model.attention: the explicit formula, or jax.nn.dot_product_attention with XLA "
              "or cuDNN flash attention (NVIDIA GPU, bfloat16); auto: per platform"),
    _arg("--kernels", choices=KERNELS, default="auto",
         help="model.kernels: the custom-VJP kernels, the plain JAX formulas, or auto (per "
              "platform: docs/benchmarks.md)"),
    _arg("--loss-chunk", type=int, default=-1,
         help="model.loss_chunk: LM loss in chunks of about N tokens, never the full logits "
              "(0: full logits; -1, the default: auto, on CPU 1024 with huge pages, else 256)"),
    _arg("--steps", type=int, default=10, help="timed steps per round"),
    _arg("--warmup", type=int, default=2, help="untimed steps after compiling"),
    _arg("--rounds", type=int, default=3, help="alternating rounds (medians)"),
    _arg("--vs", default="", metavar="PEERS",
         help="comma-separated peers timed in the same rounds: hf (transformers' PyTorch "
              "GPT2LMHeadModel + AdamW), keras (KerasHub GPT2CausalLM on Keras' JAX backend)"),
    _arg("--decode", action="store_true", help="also time greedy batch-1 decoding"),
    _arg("--decode-tokens", type=int, default=128),
    _arg("--eval", action="store_true",
         help="also time the forwards of `gpt2jax eval` (LM perplexity and a classification "
              "head) on the same batch; with --vs hf transformers' under no_grad"),
    _arg("--peak-size", type=int, default=4096,
         help="side of the square matmul that measures the peak FLOP/s"),
    _arg("--seed", type=int, default=0),
    _arg("--lora", type=int, default=0, metavar="R",
         help="time LoRA of rank R against full fine-tuning of the same shape (trainable "
              "parameters, optimizer-state bytes, step memory)"),
    _arg("--lora-targets", nargs="+", default=["c_attn"], choices=LORA_TARGETS,
         help="with --lora: the adapted projections (model.lora.targets)"),
], help="train-step tokens/s, FLOPs and MFU; --vs hf,keras compares with transformers' PyTorch "
        "and KerasHub")
def _cmd_bench(args) -> int:
    from . import bench
    from .peers import parse

    shape = _pick(args, "n_layer", "n_embd", "n_head", "vocab_size", "n_positions", "dtype",
                  "remat", "attention", "loss_chunk", "kernels")
    cfg = bench.bench_config(args.preset, scan_layers=args.scan_layers or None, **shape)
    timing = _pick(args, "batch_size", "seq_len", "steps", "warmup", "rounds", "seed")
    if not args.lora:
        s = bench.BenchSettings(vs=parse(args.vs), evaluate=args.eval,
                                **_pick(args, "decode", "decode_tokens", "peak_size"), **timing)
        _emit(bench.run_bench(cfg, s, _log), args.json, bench.format_table)
        return 0
    if args.vs or args.decode or args.eval:
        raise UserError("--lora compares LoRA with full fine-tuning in gpt2jax; run --vs, "
                        "--decode and --eval without it")
    result = bench.run_lora_bench(cfg, args.lora, tuple(args.lora_targets),
                                  bench.BenchSettings(**timing), _log)
    _emit(result, args.json, bench.format_lora_table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpt2jax", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None, *, compile_cache: bool = False) -> int:
    """Run one command; returns the exit status (0 ok, 2 bad input). `compile_cache`: keep
    compiled programs on disk for later processes (the command line's default)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # gpt2jax uses transformers for tokenizers only: its advice, printed on import where
    # torch is not installed, that models will not be available is noise here
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    debug = "--debug" in argv or os.environ.get("GPT2JAX_DEBUG") == "1"
    try:
        args, rest = build_parser().parse_known_args(argv)
        # Only these take free-form --section.key=value overrides.
        if rest and getattr(args, "command", None) not in ("train", "prepare", "demo",
                                                           "compile"):
            build_parser().parse_args(argv)  # reports the unknown arguments
        args.overrides = rest
        if not getattr(args, "func", None):
            build_parser().print_help(sys.stderr)
            raise UserError("choose a command, e.g. `gpt2jax train configs/demo.yaml`")
        # compile targets another platform; prepare only tokenizes
        cached = compile_cache and args.command not in ("compile", "prepare")
        if cached:
            from . import compile_cache as cache

            cache.enable()
        code = args.func(args)
        if isinstance(code, dict):
            _emit(code, args.json, args.text)
            code = 0
        line = cache.summary() if cached and code == 0 else ""
        if line:
            print(line, file=sys.stderr)
        return code
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"gpt2jax: error: {e}", file=sys.stderr)
        from .distributed import leave_on_error

        leave_on_error(2)  # peers waiting for this process must not wait for a timeout
        return 2
    except Preempted as e:
        print(f"gpt2jax: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("gpt2jax: error: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """Console-script entry point (also `python -m gpt2jax`): restarts once with the glibc
    malloc policy (malloc.py), then runs the command."""
    from .compile import cpu_unless_tpu

    cpu_unless_tpu()  # before JAX starts: libtpu installed, no TPU here
    malloc.ensure()
    sys.exit(main(compile_cache=True))


if __name__ == "__main__":
    entry()
