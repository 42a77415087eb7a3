"""``topkd`` command line: train, distill, eval (+ transfer, report, demo from their modules).

The text shown by ``topkd --help`` is :data:`DESCRIPTION` (plain text, no markup).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import topkd

DESCRIPTION = """\
topkd: knowledge distillation (TopKD, KD, DKD, LS, ...) from YAML configs.

    topkd train   CONFIG [key.sub=value ...] [--resume [PATH|auto]] [--seeds 0,1,2]
    topkd distill CONFIG [key.sub=value ...] [--resume [PATH|auto]] [--seeds 0,1,2]
    topkd eval    CHECKPOINT [--config CFG | --model NAME --dataset NAME] [--json]
    topkd methods [NAME]                     # distillation methods and their parameters
    topkd transfer --model NAME [--checkpoint PATH] [--dataset NAME]  # linear probe
    topkd report  RUN_DIR ... [--output FILE] [--template FILE] [--plots DIR]
    topkd demo    [--epochs N] [--methods M1,M2,...]   # teacher + students, Fashion-MNIST
    torchrun --nproc_per_node=N -m topkd distill CONFIG ...        # DDP

Configuration and validation errors print one line and exit with status 2
(set TOPKD_DEBUG=1 for the traceback).
"""

# Subcommands implemented in other modules, each exposing add_arguments(parser) and
# run(args) -> int; imported only when selected so `topkd --help` stays fast and robust.
LAZY = {
    "transfer": ("topkd.transfer", "transfer a trained model to another dataset"),
    "report": ("topkd.report", "tables and curves from run directories"),
    "demo": ("topkd.demo", "end-to-end demo on a small dataset"),
}


def _knobs() -> str:
    """Every config key with its type and default, for the --help epilog."""
    from topkd.config import Config, _type_name
    from topkd.methods import MethodParams

    lines = ["config keys (override with key.sub=value; values use YAML syntax):"]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        inst = cls()
        for f in dataclasses.fields(cls):
            tp, val = hints[f.name], getattr(inst, f.name)
            if tp is MethodParams:
                lines.append(f"  {'method.name':<26} the distillation method (default 'ce'); its "
                             "parameters are method.<param>: see 'topkd methods NAME'")
            elif dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            else:
                key = prefix + f.name
                lines.append(f"  {key:<26} {_type_name(tp)}  (default {val!r})")

    walk(Config, "")
    return "\n".join(lines)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (may compose others with 'defaults:')")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. optim.lr=0.1 train.amp=bf16")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH|auto",
                   help="resume from a last.pt, or 'auto' (RUN_DIR/checkpoints/last.pt if it "
                        "exists; the default when the flag has no value)")
    p.add_argument("--seeds", default=None, metavar="S,S,...",
                   help="run these seeds one after another into RUN_DIR/seed_<s>/ and write "
                        "RUN_DIR/summary.md + summary.csv (mean ± std)")
    p.add_argument("--output-dir", default=None, help="overrides output_dir (RUN_DIR's parent)")
    p.add_argument("--device", default=None, help="overrides train.device (auto|cpu|cuda[:N])")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="weights file (run checkpoints embed their config)")
    p.add_argument("--config", default=None, help="config giving model and dataset")
    p.add_argument("--set", nargs="*", default=[], metavar="key.sub=value",
                   help="overrides for --config, or for the config the checkpoint embeds")
    p.add_argument("--model", default=None, help="model name (topkd.models / timm:<name>)")
    p.add_argument("--model-kwargs", default=None, metavar="YAML",
                   help="model kwargs as a YAML mapping, e.g. '{width: 16}'")
    p.add_argument("--dataset", default=None, help="dataset name (topkd.data)")
    p.add_argument("--data-root", default=None, help="dataset root folder")
    p.add_argument("--split", default="test", choices=["test", "train"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=None,
                   help="data loading processes (default: the config's data.num_workers, else "
                        "4; at most the number of CPU cores)")
    p.add_argument("--no-strict", action="store_true",
                   help="load only the tensors whose names and shapes match the model (the rest "
                        "is reported and keeps its initial values)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object only")


def _command_of(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="topkd", description=DESCRIPTION, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"topkd {topkd.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    knobs = _knobs()
    for name, what in (("train", "train a model alone (e.g. a teacher): loss.base must be none"),
                       ("distill", "distill a student from a frozen teacher (or teacher cache)")):
        p = sub.add_parser(name, help=what, description=what, epilog=knobs, formatter_class=fmt)
        _add_run_args(p)
        p.set_defaults(func=_run_training, mode=name)
    p = sub.add_parser("eval", help="top-1/top-5/loss of a checkpoint on a dataset split",
                       description="Evaluate a checkpoint: top-1, top-5 accuracy and CE loss.",
                       formatter_class=fmt)
    _add_eval_args(p)
    p.set_defaults(func=_run_eval)
    p = sub.add_parser("methods", help="list the distillation methods and their parameters",
                       description="List the registered distillation methods (topkd.methods); "
                                   "with NAME, that method's parameters, defaults and needs.",
                       formatter_class=fmt)
    p.add_argument("name", nargs="?", help="a method name, e.g. dkd")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(func=_run_methods)
    chosen = _command_of(argv)
    for name, (module, what) in LAZY.items():
        p = sub.add_parser(name, help=what, description=what, formatter_class=fmt)
        if name != chosen:
            continue
        try:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(func=mod.run)
        except Exception as e:  # noqa: BLE001 - any import problem: report it cleanly
            err = f"'topkd {name}' is unavailable: cannot import {module} ({type(e).__name__}: {e})"
            if isinstance(e, ModuleNotFoundError) and (missing := _missing_extra(e)):
                err = f"'topkd {name}' is unavailable: {missing}"
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            p.set_defaults(func=lambda args, err=err: _fail(err))
    return parser


def _fail(msg: str, code: int = 2) -> int:
    print(f"topkd: error: {msg}", file=sys.stderr)
    return code


def _parse_seeds(text: str | None) -> list[int] | None:
    from topkd.config import ConfigError

    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise ConfigError(f"--seeds expects comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds expects distinct comma-separated integers, got {text!r}")
    return seeds


def _run_training(args: argparse.Namespace) -> int:
    from topkd.config import load_config
    from topkd.engine.run import run_training
    from topkd.utils.dist import cleanup_distributed

    overrides = list(args.overrides)
    resume = args.resume
    if resume is not None and "=" in resume and not Path(resume).exists():
        overrides.append(resume)  # `--resume key=value`: the flag took an override
        resume = "auto"
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    if args.device is not None:
        overrides.append(f"train.device={args.device}")
    cfg = load_config(args.config, overrides)
    seeds = _parse_seeds(args.seeds)
    try:
        summaries = run_training(cfg, args.mode, seeds=seeds, resume=resume,
                                 argv=["topkd", *args.argv])
    finally:
        cleanup_distributed()
    if int(os.environ.get("RANK", "0")) == 0 and summaries and all(summaries):
        print(f"done: {cfg.run_dir}: {_result_line(summaries)}")
    return 0


def _result_line(summaries: list[dict[str, Any]]) -> str:
    """The honest number first: test acc@1 at the best-val epoch (mean ± std over seeds)."""
    from topkd.engine.summary import format_mean_std, is_collapsed

    def stat(key: str) -> str:
        return format_mean_std([float(s[key]) for s in summaries])

    seeds = f" over {len(summaries)} seeds" if len(summaries) > 1 else ""
    if all(s.get("test_acc1_at_best_val") is not None for s in summaries):
        epochs = ", ".join(str(s["best_val_epoch"]) for s in summaries)
        out = (f"test acc@1 {stat('test_acc1_at_best_val')} at the best-val epoch{seeds} "
               f"(epoch {epochs}; last epoch {stat('last_test_acc1')})")
    else:
        out = f"last-epoch test acc@1 {stat('last_test_acc1')}{seeds} (no validation split)"
    if any(s.get("best_on") == "test" for s in summaries):
        out += (f"; best.pt picked on TEST (train.best_on=test, an oracle): "
                f"{stat('best_test_acc1')}")
    collapsed = [str(s.get("seed")) for s in summaries if is_collapsed(s)]
    if collapsed:
        out += (f"; COLLAPSED at chance level (seed {', '.join(collapsed)}: see 'warnings' in "
                "summary.json)")
    return out


def _embedded_config(path: Path) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The config a topkd checkpoint embeds (``None`` for foreign files) and its ``meta``.

    An empty, truncated or foreign file raises ``CorruptCheckpointError`` naming it, before
    any dataset or model is built.
    """
    from topkd.checkpoints import UnsafeCheckpointError, load_state_dict_file

    try:
        obj, meta = load_state_dict_file(path)
    except UnsafeCheckpointError:  # reported with its advice by load_weights
        return None, {}
    cfg = (obj.get("config") if isinstance(obj, dict) else None) or meta.get("config")
    return (cfg if isinstance(cfg, dict) else None), meta


def eval_workers(requested: int | None, cfg: Any | None) -> int:
    """``--num-workers``, else the config's ``data.num_workers``, else 4; never more processes
    than CPU cores (extra workers only compete for them)."""
    n = requested if requested is not None else (cfg.data.num_workers if cfg else 4)
    return max(0, min(n, os.cpu_count() or 1))


def _run_eval(args: argparse.Namespace) -> int:
    import yaml
    from torch.utils.data import DataLoader

    from topkd.checkpoints import (
        STRICT_HINT,
        CheckpointMismatchError,
        UnsafeCheckpointError,
        load_weights,
    )
    from topkd.config import Config, ConfigError, apply_override, load_config
    from topkd.data import get_dataset
    from topkd.engine.evaluate import evaluate
    from topkd.models import create_model
    from topkd.utils.dist import resolve_device

    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        raise ConfigError(f"checkpoint not found: {ckpt}")
    cfg: Config | None = None
    emb, meta = _embedded_config(ckpt)
    if args.config:
        cfg = load_config(args.config, args.set)
    elif emb is not None:
        for ov in args.set:  # --set applies to the checkpoint's embedded config
            apply_override(emb, ov)
        cfg = Config.from_dict(emb)
    elif args.set:
        raise ConfigError(f"--set {' '.join(args.set)}: there is no config to override ({ckpt} "
                          "embeds none): pass --config CFG, or --model/--dataset/--data-root")
    model_name = args.model or (cfg.model.name if cfg else None)
    dataset = args.dataset or (cfg.data.name if cfg else None)
    if not model_name or not dataset:
        raise ConfigError("eval needs --model and --dataset (or --config, or a checkpoint "
                          "written by topkd, which embeds its config)")
    if args.model_kwargs is not None:
        model_kw = yaml.safe_load(args.model_kwargs) or {}
        if not isinstance(model_kw, dict):
            raise ConfigError(f"--model-kwargs must be a YAML mapping, got {args.model_kwargs!r}")
    else:
        model_kw = dict(cfg.model.kwargs) if cfg and args.model is None else {}
    root = args.data_root or (cfg.data.root if cfg else None)
    data_kw = dict(cfg.data.kwargs) if cfg and args.dataset is None else {}
    wrapper = meta.get("wrapper") if args.model is None else None
    try:
        ds = get_dataset(dataset, root, args.split, augment=False, **data_kw)
        model = create_model(model_name, int(ds.info.num_classes), **model_kw)
        if wrapper:  # the method's exported network, e.g. a SimKD student + projector + head
            from topkd.models.wrappers import wrap_model

            model = wrap_model(wrapper, model, int(ds.info.num_classes))
        device = resolve_device(args.device)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    try:
        load_weights(model, ckpt, strict=not args.no_strict, verbose=not args.json)
    except CheckpointMismatchError as e:
        raise ConfigError(str(e).replace(STRICT_HINT, "  (is it the right architecture / "
                          "num_classes? --no-strict loads the matching tensors only)")) from None
    except UnsafeCheckpointError as e:
        raise ConfigError(str(e)) from None
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False,
                        num_workers=eval_workers(args.num_workers, cfg),
                        pin_memory=device.type == "cuda")
    res = evaluate(model.to(device), loader, device)
    out = {"checkpoint": str(ckpt), "model": model_name, "dataset": dataset,
           "split": args.split, "acc1": res["acc1"], "acc5": res["acc5"], "loss": res["loss"],
           "n": res["n"]}
    if wrapper:
        out["wrapper"] = wrapper["name"]
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{model_name} on {dataset}/{args.split} (n={res['n']}): top-1 {res['acc1']:.2f}  "
              f"top-5 {res['acc5']:.2f}  loss {res['loss']:.4f}")
    return 0


def _run_methods(args: argparse.Namespace) -> int:
    from topkd.config import ConfigError
    from topkd.methods.table import describe, methods_table

    try:
        print(describe(args.name) if args.name else methods_table(markdown=args.markdown))
    except ValueError as e:  # unknown method name
        raise ConfigError(str(e)) from None
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Overrides given after options (`cfg.yaml --seeds 0,1 optim.lr=0.1`) end up here.
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = argv
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if getattr(args, "func", None) is _run_training:
            return _fail("interrupted; checkpoints/last.pt holds the last finished epoch: run the "
                         "same command with --resume to continue", 130)
        return _fail("interrupted", 130)
    except ModuleNotFoundError as e:
        if (missing := _missing_extra(e)) is None or os.environ.get("TOPKD_DEBUG"):
            raise
        return _fail(missing)
    except Exception as e:
        if os.environ.get("TOPKD_DEBUG"):
            raise
        if isinstance(e, _loaded(("topkd.engine.trainer", "NonFiniteLossError"))):
            return _fail(f"training stopped: {e}", 1)
        if isinstance(e, _loaded(*USER_ERRORS)):
            return _fail(str(e))
        raise


# Errors printed as one line (exit status 2): bad configs, data, checkpoints.
USER_ERRORS = (
    ("topkd.config", "ConfigError"),
    ("topkd.data.errors", "DatasetNotFoundError"),
    ("topkd.checkpoints", "CorruptCheckpointError"),
    ("topkd.checkpoints", "UnsafeCheckpointError"),
    ("topkd.checkpoints", "CheckpointMismatchError"),
)


def _loaded(*names: tuple[str, str]) -> tuple[type, ...]:
    """The named exception classes of modules already imported (a module never imported
    cannot have raised; importing it here could fail without the optional extras)."""
    return tuple(getattr(sys.modules[m], n) for m, n in names if m in sys.modules)


def _extra_packages() -> dict[str, str]:
    """Import name -> distribution of the ``train`` extra (what a plain install lacks)."""
    return {"torchvision": "torchvision", "timm": "timm", "tqdm": "tqdm",
            "tensorboard": "tensorboard", "matplotlib": "matplotlib",
            "safetensors": "safetensors"}


def _missing_extra(e: ModuleNotFoundError) -> str | None:
    """One line for a missing optional dependency, ``None`` if ``e`` is something else."""
    root = (e.name or "").split(".")[0]
    dist = _extra_packages().get(root)
    if dist is None:
        return None
    return (f"this command needs the optional dependency {dist!r}, which is not installed: "
            "pip install 'topkd[train]'")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
