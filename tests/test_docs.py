"""What README.md and docs/*.md tell a user to run must exist.

* every ``topkd <command>`` (and ``python -m topkd.cache``) they show names a real command, and
  every ``--flag`` on that line is one of that command's options (read from its ``--help``);
* every ``key.sub=value`` override they show is a key of the config schema;
* every repository path they name (``configs/...yaml``, ``scripts/``, ``benchmarks/``, ``docs/``,
  ``src/``, ``tests/``) exists;
* every ``python`` code block compiles, and each name it imports from ``topkd`` exists.

Running the commands themselves would need datasets and hours; these checks catch the stale
pointers a new user hits first (a renamed flag, a command that never existed, a moved file).
"""

from __future__ import annotations

import ast
import importlib
import re
from functools import cache
from pathlib import Path

import pytest

from topkd import cli
from topkd.config import ConfigError, apply_override

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMANDS = ("train", "distill", "eval", "transfer", "report", "demo", "methods")
CMD = re.compile(r"(?<![\w./-])(python -m topkd\.cache|(?:python -m )?topkd) +([a-z][\w-]*)?")
PATH = re.compile(r"(?<![\w./-])((?:configs|scripts|benchmarks|docs|src|tests)/[\w./-]*[\w/])")
PLACEHOLDER = re.compile(r"[<>A-Z]|\.\.\.|\*")
# A path shortly after another project's name (within the 80 characters before it), or right
# after "its" referring back to one, is that project's file, not ours.
FOREIGN = re.compile(r"(mdistiller|RepDistiller|CRD|torchvision|timm|LS code)'?s?\b[\s\S]*$"
                     r"|\bits\W{0,3}$", re.I)


def _code(text: str) -> list[str]:
    """Lines of fenced code blocks, then inline code spans of the prose."""
    lines = [ln for m in re.finditer(r"```[^\n]*\n(.*?)```", text, re.S)
             for ln in m.group(1).splitlines()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return lines + re.findall(r"`([^`\n]+)`", prose)


@cache
def _help(command: str) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        if command == "cache":
            import topkd.cache

            topkd.cache.main(["--help"])
        else:
            cli.main([command, "--help"])
    return buf.getvalue()


def _commands() -> list[tuple[str, str, str, str]]:
    """``(doc, command, rest of the line, full segment)`` for every command shown."""
    found = []
    for doc in DOCS:
        for seg in _code(doc.read_text()):
            matches = list(CMD.finditer(seg))
            for i, m in enumerate(matches):
                word = m.group(2) or ""
                at_start = seg[: m.start()].strip() in ("", "$")
                if m.group(1).endswith(".cache"):
                    word = "cache"
                elif word not in COMMANDS and not (at_start and word):
                    continue  # prose such as "topkd's" or a table cell "topkd w_con 1"
                end = matches[i + 1].start() if i + 1 < len(matches) else len(seg)
                rest = seg[m.end(): end].split(" #")[0]
                found.append((doc.name, word, rest, seg))
    return found


def test_commands_and_flags_in_the_docs_exist():
    problems = []
    commands = _commands()
    assert len(commands) > 30
    for doc, word, rest, seg in commands:
        if word != "cache" and word not in COMMANDS:
            problems.append(f"{doc}: no command 'topkd {word}': {seg}")
            continue
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", _help(word)):
                problems.append(f"{doc}: 'topkd {word}' has no option {flag}: {seg}")
    assert not problems, "\n".join(problems)


def test_overrides_in_the_docs_are_config_keys():
    problems = []
    for doc, word, rest, seg in _commands():
        if word not in ("train", "distill") or seg.lstrip().startswith("$"):
            continue  # "$ topkd ..." lines are transcripts of deliberate errors
        for tok in rest.split():
            tok = tok.strip("[]")
            key = tok.partition("=")[0]
            if "=" not in tok or "." not in key or key.startswith("key") or tok.startswith("-"):
                continue
            try:
                apply_override({}, tok)
            except ConfigError as e:
                problems.append(f"{doc}: {tok}: {e}")
    assert not problems, "\n".join(problems)


def test_paths_named_in_the_docs_exist():
    problems = []
    for doc in DOCS:
        for m in PATH.finditer(doc.read_text()):
            path = m.group(1)
            text = doc.read_text()
            before, after = text[max(0, m.start() - 80): m.start()], text[m.end(): m.end() + 1]
            if PLACEHOLDER.search(path + after) or FOREIGN.search(before):
                continue  # a pattern such as configs/methods/<m>.yaml, or another project's file
            rest = text[m.end():].split("`", 1)[0] if after == "{" else ""
            if rest:  # shell-style braces: tests/test_method_{ofd,crd}.py names each file
                alts, _, tail = rest[1:].partition("}")
                paths = [path + a + tail for a in alts.split(",")]
            else:
                paths = [path]
            problems += [f"{doc.name}: {p}" for p in paths
                         if not PLACEHOLDER.search(p) and not (ROOT / p).exists()]
    assert not problems, "missing:\n" + "\n".join(problems)


def _python_blocks() -> list[tuple[str, str]]:
    return [(doc.name, m.group(1)) for doc in DOCS
            for m in re.finditer(r"```python\n(.*?)```", doc.read_text(), re.S)]


def test_python_snippets_compile_and_import_what_exists():
    blocks = _python_blocks()
    assert len(blocks) >= 5
    problems = []
    for doc, code in blocks:
        try:
            tree = ast.parse(code)
        except SyntaxError as e:
            problems.append(f"{doc}: snippet does not compile: {e}\n{code}")
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("topkd"):
                mod = importlib.import_module(node.module)
                problems += [f"{doc}: from {node.module} import {a.name}: no such name"
                             for a in node.names if not hasattr(mod, a.name)]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("topkd"):
                        importlib.import_module(a.name)
    assert not problems, "\n".join(problems)


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return s.replace(" ", "-")


def test_links_between_docs_resolve():
    """Every relative link (and #anchor) in README/docs points into the repository: the
    project is self-contained (no links to files outside it, e.g. a shared/method.md)."""
    problems = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists() or ROOT not in dest.parents:
                problems.append(f"{doc.name}: {target} (no such file in the repository)")
                continue
            if anchor and dest.suffix == ".md":
                heads = re.findall(r"^#+ (.+)$", dest.read_text(), re.M)
                if anchor not in {_slug(h) for h in heads}:
                    problems.append(f"{doc.name}: {target} (no such heading)")
    assert not problems, "\n".join(problems)


def test_no_reference_to_the_out_of_tree_method_spec():
    hits = [f"{p.relative_to(ROOT)}" for d in ("src", "docs", "configs", "tests", "benchmarks")
            for p in (ROOT / d).rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".yaml")
            and p != Path(__file__) and "method.md" in p.read_text()]
    hits += ["README.md"] if "method.md" in (ROOT / "README.md").read_text() else []
    assert not hits, hits
    assert (ROOT / "docs/spec.md").is_file()


def test_recipes_state_the_fashion_mnist_k_of_the_configs():
    from topkd.config import load_config

    text = (ROOT / "docs/recipes.md").read_text()
    (k,) = re.findall(r"\*\*Fashion-MNIST\*\* \(10 classes\): k (\d+)", text)
    for m in ("topkd", "kd_tsm_tdl", "dkd_tsm_tdl"):
        cfg = load_config(ROOT / f"configs/fashion_mnist/teacher_student/{m}.yaml")
        assert cfg.to_dict()["method"]["k"] == int(k), m
