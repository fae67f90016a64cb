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


# ---------------------------------------------------------------- main

COMMANDS: list[Callable] = [_add_export]


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
        args = build_parser().parse_args(argv)
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
