"""Reference configurations of the field, read from the verbatim fixtures in fixtures/reference.

``mdistiller("configs/cifar100/dkd/res56_res20.yaml")`` is the resolved yacs config the reference
trains with: its ``cfg.py`` defaults merged with the file, as ``cfg.merge_from_file`` does.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

REF = Path(__file__).resolve().parent / "fixtures" / "reference"


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in (top or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@cache
def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def resolved(repo: str, rel: str) -> dict[str, Any]:
    """``cfg_defaults.yaml`` of ``repo`` merged with its config file ``rel``."""
    return _merge(_load(REF / repo / "cfg_defaults.yaml"), _load(REF / repo / rel))


def mdistiller(rel: str) -> dict[str, Any]:
    return resolved("mdistiller", rel)


def logit_standardization(rel: str) -> dict[str, Any]:
    return resolved("logit_standardization", rel)


def logit_stand_rule() -> dict[str, Any]:
    return _load(REF / "logit_standardization" / "logit_stand.yaml")
