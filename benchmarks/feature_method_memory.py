"""Extra parameters and memory of the feature methods OFD, CRD and ReviewKD (docs/methods.md).

    PYTHONPATH=src .venv/bin/python benchmarks/feature_method_memory.py

For each method on a pair: its trainable parameters and its buffers (what it adds to a
checkpoint), built exactly as the trainer builds it (sizes from the models). CRD's memory banks
scale with the training set, so CRD is also built with the CIFAR-100 (50,000) and ImageNet-1k
(1,281,167) training-set sizes; "per step" is the contrast set CRD gathers from its two banks at
batch ``B`` (``2 * B * (nce_k + 1) * feat_dim`` floats, kept for backward) plus the ``B x N``
sampling mask.
"""

from __future__ import annotations

import torch

from topkd.methods import MethodContext, create_method
from topkd.models import create_model

MB = 1e6
PAIRS = {  # dataset: (teacher, student, input size, classes, training samples, batch)
    "CIFAR-100 resnet32x4 -> resnet8x4": ("resnet32x4", "resnet8x4", 32, 100, 50_000, 64),
    "ImageNet resnet34 -> resnet18": ("resnet34", "resnet18", 224, 1000, 1_281_167, 256),
    "ImageNet resnet50 -> mobilenetv1": ("resnet50", "mobilenetv1", 224, 1000, 1_281_167, 256),
}


def sizes(method: torch.nn.Module) -> tuple[int, int]:
    params = sum(p.numel() for p in method.parameters())
    state = sum(t.numel() * t.element_size() for t in method.state_dict().values())
    return params, state


def main() -> None:
    print("| pair | method | parameters | checkpoint state (MB) | CRD per step (MB) |")
    print("| --- | --- | --- | --- | --- |")
    for pair, (teacher, student, size, nc, n, batch) in PAIRS.items():
        t, s = create_model(teacher, nc).eval(), create_model(student, nc)
        labels = torch.arange(n) % nc
        ctx = MethodContext(nc, s, t, (3, size, size), num_samples=n, train_labels=labels)
        for name in ("ofd", "crd", "reviewkd"):
            if name == "ofd" and teacher == "resnet34":
                continue  # no published setting
            m = create_method({"name": name, **({"stu_preact": True} if size == 224 and
                                                name == "reviewkd" else {})}, ctx)
            params, state = sizes(m)
            step = "-"
            if name == "crd":
                p = m.params
                gathered = 2 * batch * (p.nce_k + 1) * p.feat_dim * 4
                step = f"{(gathered + batch * n * 4) / MB:.0f} (B={batch})"
            print(f"| {pair} | {name} | {params / 1e6:.2f} M | {state / MB:.1f} | {step} |")
            del m


if __name__ == "__main__":
    main()
