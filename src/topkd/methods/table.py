"""Human-readable listings of the registered methods (``topkd methods``, docs/methods.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .params import Params, _strip_optional, _type_name
from .registry import METHODS

__all__ = ["describe", "methods_table", "needs"]


def needs(cls: Any) -> str:
    """What the engine must provide to a method class, in words."""
    out = []
    if cls.needs_teacher:
        out.append("teacher logits" if not cls.teacher_taps else "teacher")
    else:
        out.append("no teacher")
    if cls.student_taps:
        out.append("student " + "+".join(cls.student_taps))
    if cls.teacher_taps:
        out.append("teacher " + "+".join(cls.teacher_taps))
    if cls.needs_index:
        out.append("sample indices")
    if cls.extra_views:
        out.append("views " + "+".join(cls.extra_views))
    if getattr(cls, "trainable_modules", False):
        out.append("trainable modules")
    return ", ".join(out)


def _default(v: Any) -> str:
    if isinstance(v, Params):
        return "on"
    if v is None:
        return "null"
    return repr(v)


def _rows(p: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    rows = []
    for name, tp, default, doc in p.fields_info():  # type: ignore[attr-defined]
        rows.append((prefix + name, _type_name(tp), _default(default), doc))
        sec = _strip_optional(tp)
        if isinstance(sec, type) and issubclass(sec, Params):
            rows += _rows(sec, prefix + name + ".")
    return rows


def config_names(name: str, configs_dir: str | Path | None = None) -> list[str]:
    """``configs/methods/*.yaml`` files (recursively) whose ``method.name`` is ``name``."""
    import yaml

    root = Path(configs_dir) if configs_dir is not None else \
        Path(__file__).resolve().parents[3] / "configs"
    out = []
    for p in sorted((root / "methods").rglob("*.yaml")):
        chain, names = [p], []
        while chain:  # follow defaults: to find the method name a file ends up with
            q = chain.pop()
            d = yaml.safe_load(q.read_text()) or {}
            if isinstance(d.get("method"), dict) and "name" in d["method"]:
                names.append(d["method"]["name"])
            chain += [q.parent / x for x in reversed(d.get("defaults") or [])]
        if names and names[0] == name:
            out.append(p.relative_to(root / "methods").with_suffix("").as_posix())
    return out


def methods_table(markdown: bool = False, configs_dir: str | Path | None = None) -> str:
    """One line per method: name, parameters with their defaults, needs, paper."""
    lines = []
    if markdown:
        lines += ["| method | parameters (defaults) | needs | configs (`configs/methods/`) | "
                  "paper | reference code |", "| --- | --- | --- | --- | --- | --- |"]
    for name in METHODS.names():
        cls = METHODS.get(name)
        params = ", ".join(f"{n} {d}" for n, _, d, _ in _rows(cls.Params))
        if markdown:
            cfgs = ", ".join(config_names(name, configs_dir)) or "-"
            lines.append(f"| `{name}` | {params} | {needs(cls)} | {cfgs} | {cls.paper} | "
                         f"{cls.code} |")
        else:
            lines.append(f"{name:<12} {needs(cls)}\n{'':<12} {params}")
    if not markdown:
        lines.append("\n'topkd methods NAME' shows one method's parameters; set them in a config's "
                     "'method:' section or with method.<param>=value.")
        lines.append("DOT (Zhao et al., ICCV 2023) is an optimizer, not a method: it combines with "
                     "any distillation method via optim.name=dot (optim.dot_delta; configs "
                     "methods/dot.yaml = KD + DOT; docs/methods.md).")
    return "\n".join(lines)


def describe(name: str) -> str:
    """One method's docstring summary, needs and parameter table."""
    cls = METHODS.get(name)
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    lines = [f"{cls.name}: {' '.join(doc.split())}", f"paper: {cls.paper}",
             f"reference code: {cls.code}", f"needs: {needs(cls)}", "", "parameters:"]
    rows = _rows(cls.Params)
    w = max(len(r[0]) for r in rows)
    for key, tp, default, doc in rows:
        lines.append(f"  method.{key:<{w}}  default {default:<8} {doc} ({tp})")
    return "\n".join(lines)


BEGIN, END = "<!-- methods-table:begin -->", "<!-- methods-table:end -->"


def update_docs(path: str | Path, check: bool = False) -> bool:
    """Write the generated table into ``path`` between the markers; ``check``: only compare.

    Returns whether the file is (or was already) up to date.
    """
    p = Path(path)
    text = p.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    new = f"{head}{BEGIN}\n{methods_table(markdown=True)}\n{END}{tail}"
    if new == text:
        return True
    if not check:
        p.write_text(new)
    return False


if __name__ == "__main__":  # python -m topkd.methods.table [--check] docs/methods.md
    import sys

    args = sys.argv[1:]
    ok = update_docs(args[-1] if args else "docs/methods.md", check="--check" in args)
    sys.exit(0 if ok or "--check" not in args else 1)
