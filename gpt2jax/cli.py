"""`gpt2jax` command line: parse, call the Python API, print. Nothing else lives here.

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

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors follow our one-line format
        self.print_usage(sys.stderr)
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _emit(result: dict, as_json: bool, text: Callable[[dict], str] | None = None) -> None:
    if as_json:
        print(json.dumps(result, ensure_ascii=False))
    elif text is not None:
        print(text(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")


def _step(value: str) -> int | str:
    if value == "best" or value == "latest":
        return value
    try:
        return int(value)
    except ValueError:
        raise UserError(f"--step must be a number, 'best' or 'latest', got {value!r}") from None


def _model_args(p: argparse.ArgumentParser, flag: str = "--model") -> None:
    p.add_argument(flag, required=True, metavar="SRC",
                   help="HF directory, hub name, gpt2jax run or checkpoint (hf:/run: to force)")
    p.add_argument("--step", type=_step, default=None,
                   help="for a run: a checkpoint step, 'best' or 'latest' (default)")


# ---------------------------------------------------------------- export


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a transformers directory (config, safetensors, tokenizer)")
    _model_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--backbone-only", action="store_true",
                   help="attention_pool head: export the backbone as GPT2LMHeadModel")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from .hf import export_hf
    from .sources import load_model

    model, tok, source = load_model(args.model, _latest(args.step))
    out = export_hf(model, args.out, tok, overwrite=args.overwrite,
                    backbone_only=args.backbone_only)
    _emit({"out": str(out), "source": source.describe(), "head": model.cfg.head}, args.json,
          lambda r: f"exported {r['source']} to {r['out']}")
    return 0


def _latest(step):
    return None if step == "latest" else step


# ---------------------------------------------------------------- eval, score


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity (lm) or classification metrics on a dataset")
    _model_args(p)
    p.add_argument("--data", required=True,
                   help="a .txt/.jsonl/.json/.csv/.tsv/.parquet file, a folder of them, "
                        "or hub:ORG/NAME[:CONFIG][@SPLIT]")
    p.add_argument("--task", choices=("lm", "classification"), default=None,
                   help="default: classification for a classification head, else lm")
    p.add_argument("--split", default=None, help="split of a hub dataset or a folder")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--text-unit", choices=("document", "line", "paragraph"), default="document",
                   help=".txt files: a whole file, each line, or each paragraph is a record")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None,
                   help="window / truncation length (default: the model's n_positions)")
    p.add_argument("--stride", type=int, default=None,
                   help="lm: how far windows advance over long documents (default seq-len/2)")
    p.add_argument("--predictions", default=None, metavar="FILE.jsonl",
                   help="classification: write one JSON line per example")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from .evaluate import evaluate_data
    from .sources import load_model

    model, tok, source = load_model(args.model, _latest(args.step))
    result = evaluate_data(
        model, tok, args.data, task=args.task, text_column=args.text_column,
        label_column=args.label_column, split=args.split, text_unit=args.text_unit,
        batch_size=args.batch_size, seq_len=args.seq_len, stride=args.stride,
        predictions=args.predictions,
    )
    _emit({"model": source.describe(), **result}, args.json, _eval_text)
    return 0


def _eval_text(r: dict) -> str:
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


def _add_score(sub) -> None:
    p = sub.add_parser("score", help="log-probability of an answer given a prompt")
    _model_args(p)
    p.add_argument("--prompt", required=True, help="context; may be empty")
    p.add_argument("--answer", required=True, help="the text whose probability is scored")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_score)


def _cmd_score(args) -> int:
    from .evaluate import score
    from .sources import load_model

    model, tok, _ = load_model(args.model, _latest(args.step))
    result = score(model, tok, args.prompt, args.answer)
    _emit(result, args.json, lambda r: (f"logprob {r['logprob']:.6f}  probability "
                                        f"{r['probability']:.6g}  answer_tokens "
                                        f"{r['answer_tokens']}"))
    return 0


# ---------------------------------------------------------------- train


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune (resumes the run in train.run_dir)",
                       description="gpt2jax train CONFIG [--section.key=value ...]")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from .config import load_config
    from .train import Preempted, train

    cfg = load_config(args.config, args.overrides)
    try:
        summary = train(cfg)
    except Preempted as e:
        print(f"gpt2jax: {e}", file=sys.stderr)
        return 143
    _emit(summary, args.json, _train_text)
    return 0


def _train_text(s: dict) -> str:
    lines = [f"run: {s['run_dir']}  steps {s['start_step']} -> {s['final_step']}  "
             f"({s['wall_seconds']} s, {s['params']:,} parameters, mesh {s['mesh']})"]
    if s.get("train_loss") is not None:
        lines.append(f"train loss: {s['train_loss']:.4f}")
    if s.get("validation"):
        lines.append("validation: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float)
                                                 else f"{k} {v}"
                                                 for k, v in s["validation"].items()))
    return "\n".join(lines)


# ---------------------------------------------------------------- main

COMMANDS: list[Callable] = [_add_train, _add_export, _add_eval, _add_score]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpt2jax", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("GPT2JAX_DEBUG") == "1"
    try:
        args, rest = build_parser().parse_known_args(argv)
        # Only `train` takes free-form --section.key=value overrides.
        if rest and getattr(args, "command", None) != "train":
            build_parser().parse_args(argv)  # reports the unknown arguments
        args.overrides = rest
        if not getattr(args, "func", None):
            build_parser().print_help(sys.stderr)
            raise UserError("choose a command, e.g. `gpt2jax train configs/demo.yaml`")
        return int(args.func(args) or 0)
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"gpt2jax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpt2jax: error: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
