"""Model registry: ``create_model``, ``list_models``, ``register_model``, ``model_info``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from topkd.registry import Registry

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model")

TIMM_PREFIX = "timm:"

# Default number of classes per input family (used by ``model_info`` and the docs table).
FAMILY_NUM_CLASSES = {
    "cifar": 100,
    "tiny_imagenet": 200,
    "imagenet": 1000,
    "fmnist": 10,
    "fmnist_pairs": 100,
    "timm": 1000,
    "custom": 10,
}

# Exact-case keys of mdistiller's ``cifar_model_dict`` whose lower-case spelling would clash with
# torchvision's ImageNet names: ``ResNet50`` (CIFAR, mdistiller) vs ``resnet50`` (torchvision).
# These are resolved case-sensitively before the (case-insensitive) registry lookup.
FIELD_ALIASES: dict[str, str] = {
    "ResNet18": "resnet18_cifar",
    "ResNet34": "resnet34_cifar",
    "ResNet50": "resnet50_cifar",
}


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about a registered model."""

    name: str
    family: str
    input_size: tuple[int, int, int]
    aliases: tuple[str, ...] = ()
    description: str = ""
    default_num_classes: int = field(default=10)

    def num_params(self, num_classes: int | None = None, **kwargs: Any) -> int:
        """Parameter count of the model built with ``num_classes`` (default: the family's)."""
        model = create_model(self.name, num_classes or self.default_num_classes, **kwargs)
        return count_parameters(model)


_INFO: dict[str, ModelInfo] = {}
_CANONICAL: dict[str, str] = {}


def register_model(
    name: str | None = None,
    *,
    family: str = "custom",
    input_size: tuple[int, int, int] = (3, 32, 32),
    aliases: Iterable[str] = (),
    description: str = "",
) -> Callable[[ModelFactory], ModelFactory]:
    """Register ``fn(num_classes, **kw) -> nn.Module`` under ``name`` (and ``aliases``).

    The model it builds must follow the topkd contract (``forward`` -> logits,
    ``forward_features`` -> ``(B, feature_dim)``, ``feature_dim``, ``get_classifier()``);
    :class:`topkd.models.ClassifierModel` is a convenient base.

    >>> @register_model("my_mlp", family="fmnist", input_size=(1, 28, 28))
    ... def my_mlp(num_classes: int = 10, **kw): ...
    """

    def deco(fn: ModelFactory) -> ModelFactory:
        key = (name or fn.__name__).lower()
        alias_keys = tuple(a.lower() for a in aliases)
        for k in (key, *alias_keys):
            MODELS.register(k)(fn)
            _CANONICAL[k] = key
        _INFO[key] = ModelInfo(
            name=key,
            family=family,
            input_size=tuple(input_size),  # type: ignore[arg-type]
            aliases=alias_keys,
            description=description or (fn.__doc__ or "").strip().split("\n")[0],
            default_num_classes=FAMILY_NUM_CLASSES.get(family, 10),
        )
        return fn

    return deco


def _resolve(name: str) -> str:
    name = FIELD_ALIASES.get(name, name)
    MODELS.get(name)  # raises a helpful ValueError for unknown names
    return _CANONICAL[name.lower()]


def list_models(include_aliases: bool = False) -> list[str]:
    """Registered model names (canonical only unless ``include_aliases``), sorted.

    ``timm:<name>`` models are not listed (any timm model name works).
    """
    names = MODELS.names() if include_aliases else sorted(_INFO)
    if include_aliases:
        names = sorted({*names, *FIELD_ALIASES})
    return names


def model_info(name: str) -> ModelInfo:
    """:class:`ModelInfo` for a registered name or alias (``timm:<name>`` gets a generic one)."""
    if name.startswith(TIMM_PREFIX):
        return ModelInfo(
            name=name,
            family="timm",
            input_size=(3, 224, 224),
            description="timm model (pretrained=False)",
            default_num_classes=1000,
        )
    return _INFO[_resolve(name)]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def check_model_contract(model: nn.Module, name: str = "model") -> None:
    """Raise ``TypeError`` unless ``model`` has ``forward_features``, ``feature_dim`` and
    ``get_classifier``."""
    missing = [
        a for a in ("forward_features", "feature_dim", "get_classifier") if not hasattr(model, a)
    ]
    if missing:
        raise TypeError(
            f"{name!r} does not follow the topkd model contract: missing {', '.join(missing)} "
            "(subclass topkd.models.ClassifierModel or add them)"
        )


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a model by name with a fresh (random) initialisation; never downloads weights.

    ``name`` is a registered name (case-insensitive; see :func:`list_models`), one of the
    mdistiller keys ``ResNet18``/``ResNet34``/``ResNet50`` (exact case: the CIFAR variants), or
    ``timm:<timm_name>`` for any timm model (``pretrained=False``; ``img_size``, ``patch_size``,
    ``in_chans``/``in_channels`` etc. are passed through). Load weights with
    :func:`topkd.checkpoints.load_weights`.
    """
    if name.startswith(TIMM_PREFIX):
        from topkd.models.timm_models import create_timm_model

        model = create_timm_model(name[len(TIMM_PREFIX) :], num_classes, **kwargs)
    else:
        key = _resolve(name)
        model = MODELS.get(key)(num_classes=num_classes, **kwargs)
    check_model_contract(model, name)
    return model
