"""Loading and saving model weights safely, with provenance.

* :func:`load_weights` reads topkd files, plain state_dicts, ``{"model"|"state_dict"|"net"|
  "model_state_dict": sd}`` wrappers (RepDistiller/mdistiller teachers, most training scripts),
  DDP ``module.`` / ``torch.compile`` ``_orig_mod.`` prefixes, torchvision weight files and
  ``.safetensors`` files. Pickle files are always read with ``torch.load(weights_only=True)``:
  a file that needs arbitrary unpickling is refused (:class:`UnsafeCheckpointError`).
  The file's SHA-256 is logged/printed and returned.
* :func:`save_weights` writes the topkd format atomically (temp file + ``os.replace``).

topkd format (``.pt``/``.pth``, any suffix but ``.safetensors``)::

    {"format": "topkd.weights/v1", "model": state_dict, "meta": {json-like dict}}

``.safetensors`` files hold the state_dict; ``meta`` goes to the safetensors metadata as JSON
under the key ``"topkd_meta"``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "FORMAT",
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "LoadResult",
    "UnsafeCheckpointError",
    "extract_state_dict",
    "load_state_dict_file",
    "load_teacher",
    "load_weights",
    "read_torch_file",
    "save_weights",
    "sha256_file",
    "state_dict_sha256",
]

log = logging.getLogger(__name__)

FORMAT = "topkd.weights/v1"
WRAPPER_KEYS = ("model", "state_dict", "net", "model_state_dict")
STRIP_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 25


class UnsafeCheckpointError(RuntimeError):
    """The file can only be read by unpickling arbitrary Python objects; topkd refuses."""


#: Last line of a strict-load mismatch message; front-ends replace it with their own option.
STRICT_HINT = ("  (is it the right architecture / num_classes? pass strict=False to load the "
               "matching tensors only)")


class CorruptCheckpointError(ValueError):
    """The file is empty, truncated or not a checkpoint at all (random bytes, text...)."""


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not match the model."""

    def __init__(
        self,
        message: str,
        missing: list[str],
        unexpected: list[str],
        shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.shape_mismatch = shape_mismatch


@dataclass
class LoadResult:
    """What :func:`load_weights` did. ``sha256`` identifies the exact file that was loaded."""

    path: str
    sha256: str
    source: str  # how the state_dict was found: "plain", "model", "state_dict", "safetensors"...
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    stripped_prefix: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 of a state dict's names and tensor bytes, in its order: the identity of a set
    of weights whatever file holds them (a file's hash also covers its metadata, e.g. the epoch
    times a topkd checkpoint records, so a bit-identical retraining gives another file hash)."""
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def extract_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], str]:
    """Find the state_dict in a loaded checkpoint object.

    Returns ``(state_dict, source)`` where ``source`` is ``"plain"`` or the wrapper key(s) used,
    e.g. ``"model"`` or ``"state_dict"``.
    """
    path: list[str] = []
    for _ in range(3):  # wrappers may nest, e.g. {"state_dict": {"model": sd}}
        if _is_state_dict(obj):
            return dict(obj), ".".join(path) or "plain"
        if not isinstance(obj, Mapping):
            break
        key = next((k for k in WRAPPER_KEYS if k in obj), None)
        if key is None:
            break
        path.append(key)
        obj = obj[key]
    if isinstance(obj, nn.Module):  # only reachable for objects loaded elsewhere
        return obj.state_dict(), "module"
    keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(
        "could not find a state_dict in the checkpoint: expected a mapping of name -> tensor, "
        f"or one under {', '.join(map(repr, WRAPPER_KEYS))}; found {keys}"
    )


def _strip_prefix(
    sd: dict[str, torch.Tensor], model_keys: set[str]
) -> tuple[dict[str, torch.Tensor], str | None]:
    for prefix in STRIP_PREFIXES:
        if (
            sd
            and all(k.startswith(prefix) for k in sd)
            and not any(k.startswith(prefix) for k in model_keys)
        ):
            return {k[len(prefix) :]: v for k, v in sd.items()}, prefix
    return sd, None


def _corrupt(path: Path, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path} is truncated or corrupt ({why}): it cannot be read as a checkpoint. Was it "
        "copied or written completely? Re-copy it, or use another checkpoint.")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0].split(". ")[0][:120] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def read_torch_file(path: str | os.PathLike[str],
                    map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the problem.

    Raises :class:`CorruptCheckpointError` for an empty, truncated or foreign file (torch itself
    gives a bare ``EOFError``, an internal zip error, ``KeyError``/``IndexError`` or, for random
    bytes, a misleading "re-run with weights_only=False" message) and
    :class:`UnsafeCheckpointError` only for a well-formed file that needs arbitrary unpickling.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise _corrupt(path, "the file is empty, 0 bytes")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only's refusal of a real pickle names the global it refuses; anything else
        # (e.g. "Unsupported operand") means the bytes are not a pickle stream at all.
        if "Unsupported global" not in str(e):
            raise _corrupt(path, "not a torch checkpoint: its bytes are no valid pickle or "
                                 "zip stream") from None
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it contains pickled Python objects beyond tensors and "
            "plain containers, and unpickling them could run arbitrary code. topkd always uses "
            "torch.load(weights_only=True). If you trust the file's origin, re-save just the "
            "weights once in a separate session, e.g. "
            "torch.save(torch.load(path, weights_only=False)['model'].state_dict(), 'clean.pt') "
            f"(adapt the key), and load that instead. Details: {e}"
        ) from e
    except PermissionError:
        raise
    except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError, TypeError,
            AttributeError, UnicodeDecodeError, MemoryError) as e:
        raise _corrupt(path, _first_line(e)) from None


def load_state_dict_file(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[Any, dict[str, Any]]:
    """Read a weights file safely. Returns ``(loaded_object, meta)``.

    ``.safetensors`` files are read with safetensors; everything else with
    ``torch.load(weights_only=True)`` (:func:`read_torch_file`). An empty, truncated or foreign
    file raises :class:`CorruptCheckpointError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                raw_meta = f.metadata() or {}
            meta = json.loads(raw_meta["topkd_meta"]) if "topkd_meta" in raw_meta \
                else dict(raw_meta)
            return load_file(str(path), device=str(map_location)), meta
        except PermissionError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
            raise _corrupt(path, _first_line(e)) from None
    obj = read_torch_file(path, map_location)
    meta = {}
    if isinstance(obj, Mapping) and isinstance(obj.get("meta"), Mapping):
        meta = dict(obj["meta"])
    return obj, meta


def _fmt_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f", ... (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return shown + more


def load_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    strict: bool = True,
    map_location: str | torch.device = "cpu",
    verbose: bool = True,
) -> LoadResult:
    """Load weights from ``path`` into ``model`` (in place) and return a :class:`LoadResult`.

    With ``strict=True`` any missing, unexpected or shape-mismatched key raises
    :class:`CheckpointMismatchError` listing all three groups (with shapes); BatchNorm
    ``num_batches_tracked`` buffers absent from old files are not counted as missing. With
    ``strict=False`` the matching tensors are loaded and the rest reported in the result.
    A ``(C, D, 1, 1)`` 1x1-convolution weight is accepted for a ``(C, D)`` Linear weight.
    The file's SHA-256 is logged (and printed if ``verbose``) for provenance.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    digest = sha256_file(path)
    obj, meta = load_state_dict_file(path, map_location)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        sd, source = dict(obj["model"]), "topkd"
    elif Path(path).suffix == ".safetensors":
        sd, source = dict(obj), "safetensors"
    else:
        sd, source = extract_state_dict(obj)

    own = model.state_dict()
    sd, prefix = _strip_prefix(sd, set(own))
    for k, v in list(sd.items()):  # a 1x1-conv classifier's (C, D, 1, 1) weight fits a Linear
        if k in own and own[k].dim() == 2 and tuple(v.shape) == (*own[k].shape, 1, 1):
            sd[k] = v.reshape(own[k].shape)
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    mismatch = [
        (k, tuple(sd[k].shape), tuple(own[k].shape))
        for k in sd
        if k in own and sd[k].shape != own[k].shape
    ]
    if strict and (missing or unexpected or mismatch):
        lines = [f"checkpoint {path} does not match {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
        if mismatch:
            shown = [f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatch]
            lines.append(f"  shape mismatch ({len(mismatch)}): {_fmt_keys(shown)}")
        lines.append(STRICT_HINT)
        raise CheckpointMismatchError("\n".join(lines), missing, unexpected, mismatch)

    bad = {k for k, _, _ in mismatch} | set(unexpected)
    to_load = {k: v for k, v in sd.items() if k not in bad}
    for k in own:  # old files lack num_batches_tracked: keep the model's value
        if k not in to_load and k.endswith("num_batches_tracked"):
            to_load[k] = own[k]
    model.load_state_dict(to_load, strict=strict)

    msg = f"loaded weights {path} (sha256 {digest}, {len(to_load)} tensors, source {source})"
    if not strict and (missing or unexpected or mismatch):
        msg += (
            f"; skipped: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatch)} shape-mismatched"
        )
    log.info(msg)
    if verbose:
        print(msg)
    return LoadResult(
        path=str(path),
        sha256=digest,
        source=source,
        missing_keys=missing,
        unexpected_keys=unexpected,
        shape_mismatch=mismatch,
        stripped_prefix=prefix,
        meta=meta,
    )


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _json_default(obj: Any) -> Any:
    """Make numpy/torch scalars and arrays, paths and sets JSON-friendly."""
    if isinstance(obj, torch.Tensor | os.PathLike | set | frozenset | tuple) or hasattr(
        obj, "tolist"
    ):
        if isinstance(obj, os.PathLike):
            return os.fspath(obj)
        if isinstance(obj, set | frozenset):
            return sorted(obj, key=str)
        return obj.tolist() if hasattr(obj, "tolist") else list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _check_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(meta), default=_json_default))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"meta must be JSON-serialisable (str/int/float/bool/None/list/dict): {e}"
        ) from e


def save_weights(
    model: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    meta: Mapping[str, Any] | None = None,
) -> str:
    """Save ``model``'s state_dict (DDP/compile wrappers removed) atomically; return its SHA-256.

    ``.safetensors`` paths are written with safetensors, others as the topkd format
    ``{"format": FORMAT, "model": sd, "meta": meta}`` (loadable with ``weights_only=True``).
    """
    sd = dict(model) if isinstance(model, Mapping) else _unwrap(model).state_dict()
    sd = {k: v.detach().cpu() for k, v in sd.items()}
    meta_d = _check_meta(meta or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(
                {k: v.contiguous().clone() for k, v in sd.items()},
                tmp,
                metadata={"format": FORMAT, "topkd_meta": json.dumps(meta_d)},
            )
        else:
            torch.save({"format": FORMAT, "model": sd, "meta": meta_d}, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return sha256_file(path)


def load_teacher(
    name: str,
    num_classes: int,
    path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    verbose: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Create ``name``, load ``path`` strictly, switch to eval mode and freeze every parameter.

    The SHA-256 of the file is kept on the model as ``model.weights_sha256``.
    """
    from topkd.models import create_model

    model = create_model(name, num_classes, **kwargs)
    result = load_weights(model, path, strict=True, map_location=map_location, verbose=verbose)
    model.eval()
    model.requires_grad_(False)
    model.weights_sha256 = result.sha256
    return model
