"""README.md and docs/ name only what the repository holds: every repository path exists, every ``refseg``
flag is an option of the command it is given to (parsed from ``refseg.cli.build_parser()``), every
``refseg.x.y`` name imports, and every relative link resolves."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("engine", "kernels", "export", "csrc", "tests", "bench", "docs", ".ci", "setup.py", "CMakeLists.txt")
PATH = re.compile(r"^(?:%s)(?:/[\w.\-]+)*/?$" % "|".join(re.escape(t) for t in TOP))
SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
NAME = re.compile(r"(?<![\w./<])(refseg(?:\.\w+)+)(?![\w>])")


def _subcommands() -> dict[str, set[str]]:
    from refseg.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    top = set(parser._option_string_actions)
    return {name: set(p._option_string_actions) | top for name, p in subparsers.choices.items()}


def _code_lines(text: str) -> list[str]:
    """Lines of fenced blocks (continuations joined) and inline code spans."""
    lines, inside, pending = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if inside:
            pending += line.rstrip("\\") + " "
            if not line.rstrip().endswith("\\"):
                lines.append(pending.strip())
                pending = ""
    return lines + SPAN.findall(text)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_repository_paths_and_links_exist(doc):
    text = doc.read_text(encoding="utf-8")
    missing = []
    for span in SPAN.findall(text):
        for token in span.split():
            token = token.strip("(),;:")
            if PATH.match(token) and not (ROOT / token).exists():
                missing.append(token)
    for target in LINK.findall(text):
        if not re.match(r"^[a-z]+://|^#", target) and not (doc.parent / target.split("#")[0]).exists():
            missing.append(target)
    assert not missing, f"{doc.name} names paths the repository does not hold: {missing}"
    assert "../shared" not in text and "bench_distributed" not in text


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_refseg_flags_exist(doc):
    commands = _subcommands()
    every = set().union(*commands.values())
    unknown = []
    for line in _code_lines(doc.read_text(encoding="utf-8")):
        words = line.split()
        if line.startswith("--"):  # an inline flag: some refseg command must have it
            unknown += [f for f in FLAG.findall(words[0]) if f not in every]
        for i, word in enumerate(words):
            if word.endswith("refseg") and i + 1 < len(words) and words[i + 1] in commands:
                command = words[i + 1]
                unknown += [f"{command} {f}" for f in FLAG.findall(" ".join(words[i + 2:]).split("|")[0])
                            if f not in commands[command]]
    assert not unknown, f"{doc.name} names refseg flags that do not exist: {unknown}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_refseg_names_import(doc):
    missing = []
    for name in set(NAME.findall(doc.read_text(encoding="utf-8"))):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(name)
            break
        else:
            missing.append(name)
    assert not missing, f"{doc.name} names refseg modules or attributes that do not exist: {sorted(missing)}"


def test_readme_is_short_and_keeps_the_ci_blocks():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    assert "<!-- ci: setup" in text and "<!-- ci: tests" in text
