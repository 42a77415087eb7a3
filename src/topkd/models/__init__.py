"""Model zoo: CIFAR (RepDistiller/mdistiller layouts), ImageNet (torchvision ResNets,
MobileNetV1), Fashion-MNIST demo CNNs, and any timm model as ``timm:<name>``.

>>> from topkd.models import create_model
>>> model = create_model("resnet8x4", num_classes=100)

Every model returns logits from ``forward``, pooled penultimate features ``(B, feature_dim)``
from ``forward_features`` and its last ``nn.Linear`` from ``get_classifier()``; intermediate
features for feature distillation come from :class:`FeatureTaps` (``feature_taps()`` on each
model says where they are read). Importing this
package imports torch only (torchvision and timm are imported when such a model is created).
"""

from topkd.models import (  # noqa: F401  (imported for their registrations)
    cifar_resnet,
    cifar_resnetv2,
    fmnist,
    imagenet_resnet,
    mobilenetv1,
    mobilenetv2,
    mobilenetv2_tinyimagenet,
    shufflenet,
    vgg,
    wrn,
)
from topkd.models._base import ClassifierModel, GlobalAvgPool, adaptive_global_pool, global_pool
from topkd.models._factory import (
    FIELD_ALIASES,
    MODELS,
    ModelInfo,
    check_model_contract,
    count_parameters,
    create_model,
    list_models,
    model_info,
    register_model,
)
from topkd.models.features import (
    TAP_KINDS,
    FeatureTaps,
    Tap,
    TapPoint,
    feature_shapes,
)

__all__ = [
    "FIELD_ALIASES",
    "MODELS",
    "TAP_KINDS",
    "ClassifierModel",
    "FeatureTaps",
    "GlobalAvgPool",
    "ModelInfo",
    "check_model_contract",
    "count_parameters",
    "adaptive_global_pool",
    "create_model",
    "feature_shapes",
    "global_pool",
    "list_models",
    "model_info",
    "register_model",
    "Tap",
    "TapPoint",
]
