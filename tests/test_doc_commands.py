"""Every example in README.md, docs/*.md and launch/ names real things: `gpt2jax`
subcommands and their flags (from the CLI's own argparse parser), `--section.key`
overrides and `section.key` names (from gpt2jax.config's dataclasses), and config files
under configs/ (on disk); a `gpt2jax train|prepare configs/X.yaml --section.key=value ...`
example must also load (load_config validates the values and their combination).

Only code is read: fenced blocks and `inline spans` of the Markdown files, and the usage
lines (comments indented past "# ") of the scripts and YAML files in launch/. An inline
`model.name` may also name something in the module of that name (`model.attention_core`);
KEY-style capitals are placeholders (`--dist.KEY=value`)."""

from __future__ import annotations

import dataclasses
import re
import shlex
from importlib import import_module
from pathlib import Path

import pytest

from gpt2jax.cli import build_parser
from gpt2jax.config import Config, load_config
from gpt2jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "launch").rglob("*.md"))]
SCRIPTS = sorted(p for p in (ROOT / "launch").rglob("*") if p.suffix in ("", ".sh", ".sbatch",
                                                                         ".yaml") and p.is_file())

KEYS = {f.name: {g.name for g in dataclasses.fields(f.default_factory())}
        for f in dataclasses.fields(Config)}
SECTION = "|".join(KEYS)
COMMAND = re.compile(r"(?<![\w./-])(?<!from )(?<!import )gpt2jax\s+([a-z][\w-]*)(.*)")
OVERRIDE = re.compile(rf"--({SECTION})\.(\w+)")
DOTTED = re.compile(rf"^({SECTION})\.(\w+)(=.*)?$")  # a whole inline span: train.steps=5
FILE_SUFFIXES = {"json", "jsonl", "py", "yaml", "yml", "md", "txt", "csv", "npy", "png"}
BRACED = re.compile(rf"\b({SECTION})\.\{{([\w,\s]+)\}}")  # model.{n_layer,n_embd}
CONFIG_FILE = re.compile(r"\bconfigs/[\w./-]+\.ya?ml\b")


def _subcommands() -> dict[str, set[str]]:
    """{subcommand: its option strings} from the real parser."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    return {name: set(p._option_string_actions) for name, p in sub.choices.items()}


def _module_has(module: str, name: str) -> bool:
    """Whether gpt2jax.MODULE exists and defines NAME."""
    try:
        return hasattr(import_module(f"gpt2jax.{module}"), name)
    except ModuleNotFoundError:
        return False


def _markdown_code(text: str) -> list[tuple[int, str]]:
    """(line number, code) for every line of a fenced block and every inline span; a
    backslash-continued shell line is joined to the next."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            if not line.lstrip().startswith("#"):  # a comment line in a block is prose
                out.append((n, line))
        else:
            out.extend((n, span) for span in re.findall(r"`([^`]+)`", line))
    return _join_continuations(out)


def _script_comments(text: str) -> list[tuple[int, str]]:
    """Usage lines: comments indented by two or more spaces (`#   sbatch ...`)."""
    return _join_continuations([(n, line.split("#", 1)[1]) for n, line in
                                enumerate(text.splitlines(), 1)
                                if re.match(r"\s*#\s\s", line)])


def _join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for n, line in lines:
        if out and out[-1][1].rstrip().endswith("\\"):
            out[-1] = (out[-1][0], out[-1][1].rstrip()[:-1] + " " + line.strip())
        else:
            out.append((n, line))
    return out


def _code(markdown: list[Path], scripts: list[Path], root: Path) -> list[tuple[str, str]]:
    """(where, code) over all the files."""
    found = []
    for paths, extract in ((markdown, _markdown_code), (scripts, _script_comments)):
        for path in paths:
            found += [(f"{path.relative_to(root)}:{n}", c) for n, c in extract(path.read_text())]
    return found


def _words(rest: str) -> list[str]:
    """The arguments of one command: up to a pipe, `;`, `&&`, a comment or a subshell's end."""
    rest = re.split(r"\s(?:\||;|&&|#)\s|[)`]", rest)[0]
    try:
        return shlex.split(rest)
    except ValueError:  # an unbalanced quote in prose-like code: plain words
        return rest.split()


def _problems(markdown: list[Path] = MARKDOWN, scripts: list[Path] = SCRIPTS,
              root: Path = ROOT) -> tuple[list[str], dict[str, int]]:
    """(one line per wrong name, how many of each kind were checked)."""
    commands = _subcommands()
    bad, seen = [], {"commands": 0, "flags": 0, "keys": 0, "configs": 0, "configs_loaded": 0}

    def key(where: str, section: str, name: str) -> None:
        seen["keys"] += 1
        if name.isupper():
            return  # a placeholder
        if section not in KEYS:
            bad.append(f"{where}: --{section}.{name}: {section} is not a config section")
        elif name not in KEYS[section]:
            bad.append(f"{where}: {section}.{name} is not a config key")

    for where, code in _code(markdown, scripts, root):
        for m in OVERRIDE.finditer(code):
            key(where, m.group(1), m.group(2))
        m = DOTTED.match(code.strip())
        if m and m.group(2) not in FILE_SUFFIXES and (
                m.group(3) or not _module_has(m.group(1), m.group(2))):
            key(where, m.group(1), m.group(2))
        for m in BRACED.finditer(code):
            for name in m.group(2).replace(" ", "").split(","):
                key(where, m.group(1), name)
        for path in CONFIG_FILE.findall(code):
            seen["configs"] += 1
            if not (root / path).is_file():
                bad.append(f"{where}: {path} does not exist")
        for m in COMMAND.finditer(code):
            name, rest = m.group(1), m.group(2)
            seen["commands"] += 1
            if name not in commands:
                bad.append(f"{where}: `gpt2jax {name}` is not a subcommand")
                continue
            words = _words(rest)
            if name in ("train", "prepare") and words and CONFIG_FILE.fullmatch(words[0]) \
                    and (root / words[0]).is_file():
                seen["configs_loaded"] += 1
                overrides = [w for w in words[1:] if OVERRIDE.match(w)]
                try:  # the overrides' values and the combination validate too
                    load_config(root / words[0], overrides)
                except UserError as e:
                    bad.append(f"{where}: `gpt2jax {name} {shlex.join(words)}`: {e}")
            for word in words:
                flag = word.split("=", 1)[0]
                if flag.startswith("--") and "." in flag:
                    if not OVERRIDE.match(flag):  # known sections were checked above
                        key(where, *flag[2:].split(".", 1))
                elif flag.startswith("--") and len(flag) > 2:
                    seen["flags"] += 1
                    if flag not in commands[name]:
                        bad.append(f"{where}: `gpt2jax {name}` has no option {flag}")
    return bad, seen


def test_every_example_names_real_commands_flags_keys_and_files():
    bad, seen = _problems()
    assert not bad, "\n".join(bad)
    # the extraction found what it is meant to check (a broken regex would find nothing)
    assert seen["commands"] >= 40 and seen["flags"] >= 60, seen
    assert seen["keys"] >= 60 and seen["configs"] >= 10 and seen["configs_loaded"] >= 10, seen


@pytest.mark.parametrize("text, problem", [
    ("```\ngpt2jax train configs/nope.yaml\n```", "configs/nope.yaml does not exist"),
    ("run `gpt2jax train configs/demo.yaml --run.name=x`", "run is not a config section"),
    ("`gpt2jax trian configs/demo.yaml`", "`gpt2jax trian` is not a subcommand"),
    ("```\ngpt2jax bench --n-layers 2 \\\n  --json\n```", "has no option --n-layers"),
    ("set `train.stpes=5`", "train.stpes is not a config key"),
    ("keys `model.{n_layer,n_embed}`", "model.n_embed is not a config key"),
    ("`gpt2jax train configs/demo.yaml --mesh.data=-1 --mesh.fsdp=-1`", "at most one of"),
])
def test_the_check_finds_a_wrong_example(tmp_path, text, problem):
    """Each kind of mistake in a Markdown file is reported, once."""
    doc = tmp_path / "doc.md"
    doc.write_text(text + "\n")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text((ROOT / "configs" / "demo.yaml").read_text())
    bad, _ = _problems([doc], [], tmp_path)
    assert len(bad) == 1 and problem in bad[0], bad
