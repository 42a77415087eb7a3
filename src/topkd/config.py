"""Typed run configuration: dataclasses, YAML ``defaults:`` composition and CLI overrides.

>>> cfg = load_config("configs/cifar100/resnet32x4_resnet8x4/topkd.yaml", ["optim.lr=0.1"])
>>> cfg.optim.lr
0.1

Every value is validated against its field type; errors are :class:`ConfigError` naming the key
and what is allowed, so the CLI can print one clean line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from topkd.methods import MethodParams, ParamError, params_from_dict, params_to_dict


class ConfigError(ValueError):
    """Invalid configuration: unknown key, bad value, missing file or broken ``defaults:``."""


@dataclass
class ViewConfig:
    """One extra view of each training image (``data.views.<name>``): the per-image keys of
    ``data`` with the same meaning, drawn independently of the main view."""

    augment: bool = True
    auto_augment: str | None = None
    aa_interpolation: Literal["random", "bilinear", "bicubic", "nearest"] = "random"
    re_prob: float = 0.0
    re_mode: Literal["const", "rand", "pixel"] = "pixel"
    re_count: int = 1


@dataclass
class DataConfig:
    name: str = "cifar100"
    root: str = "data"
    batch_size: int = 64  # global batch, split across DDP ranks
    eval_batch_size: int = 256
    num_workers: int = 4  # DataLoader workers (the batched loader runs on the training device)
    # "auto": batched (whole batches cropped/flipped/normalised on the training device,
    # topkd.engine.batched) for in-memory datasets whose augmentation has a batched form, the
    # DataLoader otherwise; "batched": that or an error saying why not; "dataloader": always
    # per-image transforms in a torch DataLoader.
    loader: Literal["auto", "batched", "dataloader"] = "auto"
    val_fraction: float = 0.0  # > 0: held-out val split carved from train with val_seed
    val_seed: int = 0
    # Not in the original schema sketch: train on a fixed random subset of this many training
    # images (after the val split; drawn with val_seed, so every run/seed sees the same images).
    train_subset: int | None = None
    augment: bool = True  # the dataset's own crop/flip (docs/data.md)
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Augmentation policies from timm (topkd.data.augment; docs/data.md, "Augmentation").
    # Defaults are "off"; the values in comments are DeiT's.
    auto_augment: str | None = None  # timm policy ("rand-m9-mstd0.5-inc1") or "mlkd"
    aa_interpolation: Literal["random", "bilinear", "bicubic", "nearest"] = "random"  # bicubic
    re_prob: float = 0.0  # timm RandomErasing probability (0.25)
    re_mode: Literal["const", "rand", "pixel"] = "pixel"
    re_count: int = 1
    mixup_alpha: float = 0.0  # timm Mixup (0.8)
    cutmix_alpha: float = 0.0  # (1.0)
    cutmix_minmax: tuple[float, float] | None = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    label_smoothing: float = 0.0  # (0.1)
    # Extra views of each training image for methods that ask for them (e.g. MLKD's "strong").
    views: dict[str, ViewConfig] = field(default_factory=dict)


@dataclass
class ModelConfig:
    name: str = "resnet8x4"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherConfig:
    name: str | None = None
    checkpoint: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw", "dot"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5.0e-4
    betas: tuple[float, float] = (0.9, 0.999)
    # DOT only (topkd.engine.dot; null = not set, an error with another optimizer): task /
    # distillation momentum = momentum -/+ dot_delta (null -> the reference's 0.075), and the
    # corrected first step of parameters that get only the distillation gradient.
    dot_delta: float | None = None
    dot_kd_only_init_wd: bool | None = None


@dataclass
class SchedConfig:
    name: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    warmup_epochs: int = 0
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 240
    # Speed switches (docs/training.md, "Speed"); "auto" picks what measured faster and safe:
    # amp bf16 on CUDA GPUs that support it, channels_last for convolutional models,
    # compile on CUDA (topkd.engine.speed).
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"
    compile: bool | Literal["auto"] = "auto"
    device: str = "auto"
    grad_clip: float | None = None
    log_every: int = 50
    max_steps_per_epoch: int | None = None
    teacher_cache: str | None = None
    # Not in the original schema sketch (added for the engine): resume + SyncBN.
    resume: str | None = None  # path to a checkpoint, or "auto" (RUN_DIR/checkpoints/last.pt)
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm under DDP (CUDA only)
    # Which split picks checkpoints/best.pt: "val" (held-out; needs data.val_fraction > 0),
    # "test" (an oracle: labelled so in summary.json and best.pt) or "auto" (val when there is
    # a val split, else no best.pt: the run's number is then its last epoch).
    best_on: Literal["auto", "val", "test"] = "auto"


@dataclass
class Config:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    deterministic: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # The distillation method and its parameters (topkd.methods): {name: dkd, beta: 8.0, ...}.
    method: MethodParams = field(default_factory=lambda: params_from_dict({"name": "ce"}))
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        cfg = _build(cls, data, "")
        _check_ranges(cfg)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write the resolved config (every field) as YAML, atomically."""
        from topkd.utils.io import atomic_write_text

        atomic_write_text(path, self.to_yaml())

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


class _Dumper(yaml.SafeDumper):
    """Block-style mappings, flow-style lists (``milestones: [150, 180, 210]``)."""


_Dumper.add_representer(
    list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Load ``path`` (resolving ``defaults:`` recursively), apply ``key.sub=value`` overrides.

    An override ``method.name=X`` that changes the method starts ``method`` afresh from X's
    reference defaults (the file's parameters belong to the other method); it is applied before
    the other overrides, so ``method.name=kd method.temperature=2`` works in any order.
    """
    raw = load_raw(path)
    names = [ov for ov in overrides if ov.partition("=")[0].strip() == "method.name"]
    for ov in names:
        value = _parse_value(ov.partition("=")[2])
        section = raw.get("method")
        if not isinstance(section, dict) or section.get("name") != value:
            raw["method"] = {"name": value}
    for ov in overrides:
        if ov not in names:
            apply_override(raw, ov)
    return Config.from_dict(raw)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text  # e.g. an unquoted string with a colon: keep it verbatim


def load_raw(path: str | Path, _stack: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The merged YAML mapping of ``path`` and its ``defaults:`` (relative to the file)."""
    p = Path(path).expanduser().resolve()
    if p in _stack:
        chain = " -> ".join(str(s) for s in (*_stack, p))
        raise ConfigError(f"cyclic 'defaults:' in config files: {chain}")
    if not p.is_file():
        where = f" (listed in 'defaults:' of {_stack[-1]})" if _stack else ""
        raise ConfigError(f"config file not found: {p}{where}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {p}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    defaults = data.pop("defaults", None) or []
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(f"{p}: 'defaults' must be a list of relative file paths")
    merged: dict[str, Any] = {}
    for d in defaults:
        merged = deep_merge(merged, load_raw(p.parent / d, (*_stack, p)))
    return deep_merge(merged, data)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """New dict: mappings merge recursively, any other value (lists too) is replaced by ``top``."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed with YAML scalar/flow rules) to ``raw`` in place.

    The key path is checked against the schema here; the value is checked by
    :meth:`Config.from_dict` afterwards, so file values and overrides share one validator.
    """
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    key, _, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key component")
    tp: Any = Config
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if tp is Any:
            continue  # free-form mapping (e.g. model.kwargs.drop_rate)
        tp = _strip_optional(tp)
        if tp is MethodParams:
            tp = Any  # keys depend on method.name: checked (with did-you-mean) by from_dict
            continue
        if dataclasses.is_dataclass(tp):
            allowed = [f.name for f in dataclasses.fields(tp)]
            if part not in allowed:
                raise ConfigError(
                    f"unknown config key {here!r}; allowed keys"
                    f"{' under ' + repr('.'.join(parts[:i])) if i else ''}: {', '.join(allowed)}"
                )
            tp = typing.get_type_hints(tp)[part]
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1] if get_args(tp) else Any
        else:
            parent = ".".join(parts[:i])
            raise ConfigError(
                f"config key {parent!r} is a value, not a section: cannot set {here!r}")
    value = _parse_value(text)
    node = raw
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


# --------------------------------------------------------------------------- validation


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of {" + ", ".join(str(a) for a in get_args(tp)) + "}"
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args if a is not ...)}]"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _bad(key: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(f"invalid value for {key!r}: {value!r}; expected {_type_name(tp)}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if tp is MethodParams:
        try:
            return params_from_dict(value)
        except ParamError as e:
            raise ConfigError(str(e)) from None
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _bad(key, value, tp)
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise _bad(key, value, tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise _bad(key, value, tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(key, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _bad(key, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _bad(key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _bad(key, value, tp)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _bad(key, value, tp)
        (elem,) = get_args(tp) or (Any,)
        return [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _bad(key, value, tp)
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _bad(key, value, tp)
        args = get_args(tp)
        if len(args) == 2 and args[1] is not Any:
            return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    raise TypeError(f"unsupported config field type {tp!r} for {key}")  # pragma: no cover


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in allowed:
            where = f" under {prefix.rstrip('.')!r}" if prefix else ""
            raise ConfigError(
                f"unknown config key {prefix + str(k)!r}; allowed keys{where}: {', '.join(allowed)}"
            )
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def _check_ranges(cfg: Config) -> None:
    def need(ok: bool, key: str, what: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"invalid value for {key!r}: {value!r}; expected {what}")

    d, t, o, s = cfg.data, cfg.train, cfg.optim, cfg.sched
    need(d.batch_size >= 1, "data.batch_size", "an integer >= 1", d.batch_size)
    need(d.eval_batch_size >= 1, "data.eval_batch_size", "an integer >= 1", d.eval_batch_size)
    need(d.num_workers >= 0, "data.num_workers", "an integer >= 0", d.num_workers)
    need(d.train_subset is None or d.train_subset >= 1, "data.train_subset",
         "null or an integer >= 1", d.train_subset)
    need(0.0 <= d.val_fraction < 1.0, "data.val_fraction", "a float in [0, 1)", d.val_fraction)
    if t.best_on == "val" and d.val_fraction == 0:
        raise ConfigError("train.best_on=val needs a validation split: set data.val_fraction > 0 "
                          "(or train.best_on=auto: no best.pt without one)")
    need(t.epochs >= 1, "train.epochs", "an integer >= 1", t.epochs)
    need(t.log_every >= 1, "train.log_every", "an integer >= 1", t.log_every)
    need(t.max_steps_per_epoch is None or t.max_steps_per_epoch >= 1,
         "train.max_steps_per_epoch", "null or an integer >= 1", t.max_steps_per_epoch)
    need(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", "null or > 0", t.grad_clip)
    dev = t.device
    ok_dev = dev in ("auto", "cpu", "cuda", "mps") or (
        dev.startswith("cuda:") and dev[5:].isdigit())
    need(ok_dev, "train.device", "auto, cpu, cuda, cuda:N or mps", dev)
    need(o.lr > 0, "optim.lr", "a float > 0", o.lr)
    need(o.weight_decay >= 0, "optim.weight_decay", "a float >= 0", o.weight_decay)
    need(s.warmup_epochs >= 0, "sched.warmup_epochs", "an integer >= 0", s.warmup_epochs)
    need(list(s.milestones) == sorted(s.milestones), "sched.milestones", "increasing epochs",
         s.milestones)
    from topkd.data.augment import check_config

    try:
        check_config(d)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_dot(cfg)


def _check_dot(cfg: Config) -> None:
    """DOT's keys only with ``optim.name=dot``; fill its defaults; reject what it cannot do."""
    o, t = cfg.optim, cfg.train
    keys = ("dot_delta", "dot_kd_only_init_wd")
    if o.name != "dot":
        for k in keys:
            if getattr(o, k) is not None:
                raise ConfigError(f"optim.{k} is a setting of the DOT optimizer and has no effect "
                                  f"with optim.name={o.name}: remove it or set optim.name=dot")
        return
    from topkd.engine.dot import REFERENCE_DELTA
    from topkd.methods import method_class

    if o.dot_delta is None:
        o.dot_delta = REFERENCE_DELTA
    if o.dot_kd_only_init_wd is None:
        o.dot_kd_only_init_wd = False
    if not 0 < o.momentum < 1:
        raise ConfigError(f"invalid value for 'optim.momentum': {o.momentum!r}; DOT (optim.name="
                          "dot) splits the momentum, so it needs a momentum in (0, 1)")
    if not (0 <= o.dot_delta < o.momentum and o.momentum + o.dot_delta < 1):
        raise ConfigError(f"invalid value for 'optim.dot_delta': {o.dot_delta!r}; expected "
                          f"0 <= dot_delta < momentum ({o.momentum}) and momentum + dot_delta < 1 "
                          "(task / distillation momentum = momentum -/+ dot_delta, both in (0, 1))")
    if o.dot_kd_only_init_wd and o.weight_decay == 0:
        raise ConfigError("optim.dot_kd_only_init_wd=true has no effect with "
                          "optim.weight_decay=0 (it adds weight decay to a first step)")
    if o.nesterov:
        raise ConfigError("optim.nesterov=true: DOT has no Nesterov variant (neither has the "
                          "reference optimizer); set optim.nesterov=false")
    if t.grad_clip is not None:
        raise ConfigError("train.grad_clip is not supported with optim.name=dot: DOT applies "
                          "the task and distillation gradients through separate momentum "
                          "buffers, and the reference clips neither; set train.grad_clip=null")
    if t.amp == "fp16":
        raise ConfigError("train.amp=fp16 is not supported with optim.name=dot (its two backward "
                          "passes would need two loss-scaler steps): use train.amp=bf16 or none")
    mcls = method_class(cfg.method)
    if not mcls.needs_teacher:
        raise ConfigError(f"optim.name=dot optimises the distillation gradient separately, but "
                          f"method {mcls.name!r} has no distillation term: use "
                          "optim.name=sgd to train a model alone, or a distillation method with "
                          "'topkd distill'")


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, MethodParams):
        return _to_plain(params_to_dict(obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj
