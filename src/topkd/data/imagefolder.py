"""ImageNet and any dataset in ImageFolder layout (``root/{train,val}/<class>/*``).

Uses torchvision's ``ImageFolder``/``default_loader``; the test split is ``val/``. Labels come
from the sorted class folders of ``train/`` for both splits, so a ``val/`` missing a class still
gets the right indices (and a ``val/`` with unknown classes is an error). With no ``train/`` at
all, the test split uses ``val/``'s own sorted folders (evaluation-only setups).
"""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from .base import ImageDataset
from .errors import DatasetNotFoundError, not_found
from .transforms import Transform

IMAGENET_URL = (
    "https://image-net.org/download.php (ILSVRC2012 train + val; sort val into class folders, "
    "e.g. with the common valprep.sh)"
)
SPLIT_DIR = {"train": "train", "test": "val"}


def class_dirs(folder: Path) -> list[str]:
    """Sorted class-folder names, as ``ImageFolder`` would use them."""
    return find_classes(str(folder))[0]


class ImageFolderDataset(ImageFolder, ImageDataset):
    """``ImageFolder`` over ``root/train`` or ``root/val`` with a train-derived class mapping."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Transform | None = None,
        eval_transform: Transform | None = None,
        *,
        title: str = "ImageFolder",
        get_it: str = "arrange your images as root/train/<class>/*.jpg and root/val/<class>/*.jpg",
    ) -> None:
        root = Path(root).expanduser()
        layout = f"  {root}/train/<class>/*.JPEG\n  {root}/val/<class>/*.JPEG"
        split_dir = root / SPLIT_DIR[split]
        # Evaluating with only val/ present: its own (sorted) folders define the classes.
        train_dir = root / "train" if (root / "train").is_dir() or split == "train" else split_dir
        for d in (train_dir, split_dir):
            if not d.is_dir():
                raise not_found(title, f"folder '{d.name}/'", [root], get_it, layout)
        try:
            classes = class_dirs(train_dir)
            extra = set(class_dirs(split_dir)) - set(classes) if split != "train" else set()
        except FileNotFoundError as e:
            raise DatasetNotFoundError(f"{title}: {e} (looked in {train_dir})") from e
        if extra:
            raise ValueError(
                f"{split_dir}: class folders not present in train/: {sorted(extra)[:5]} "
                "(is val/ still flat or differently named?)"
            )
        self._class_to_idx = {c: i for i, c in enumerate(classes)}
        try:
            # val/ may lack a class; train/ may not.
            super().__init__(str(split_dir), transform=transform, allow_empty=split != "train")
        except FileNotFoundError as e:
            raise DatasetNotFoundError(f"{title}: {e}\nExpected layout:\n{layout}") from e
        self.eval_transform = eval_transform
        self.split = split

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        # Use train/'s mapping for every split (see module docstring).
        return list(self._class_to_idx), dict(self._class_to_idx)
