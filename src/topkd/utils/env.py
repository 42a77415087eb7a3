"""Capture of the software/hardware environment of a run (``RUN_DIR/env.json``)."""

from __future__ import annotations

import datetime
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import topkd


def git_info(path: Path | None = None) -> dict[str, Any]:
    """``{"git_hash", "git_dirty"}`` of the checkout containing ``path`` (None if not in git)."""
    cwd = Path(path or Path(topkd.__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, timeout=5)
        if head.returncode != 0:
            return {"git_hash": None, "git_dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=cwd, capture_output=True, text=True, timeout=5)
        return {"git_hash": head.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_hash": None, "git_dirty": None}


def collect_env(seed: int, argv: list[str] | None = None, world_size: int = 1,
                device: torch.device | str | None = None) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    dev = torch.device(device) if device is not None else None
    env: dict[str, Any] = {
        "topkd_version": topkd.__version__,
        **git_info(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name(dev) if cuda and dev is not None and dev.type == "cuda"
        else None,
        "hostname": socket.gethostname(),
        "argv": list(sys.argv if argv is None else argv),
        "seed": seed,
        "world_size": world_size,
        "device": str(dev) if dev is not None else None,
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        pass
    return env
