"""OFD, CRD and ReviewKD through the engine on a real zoo pair (resnet8 -> resnet8, CPU):
training moves the method's modules, and a resumed run is bit-exact (student, method modules and
buffers such as CRD's memory banks and Z, optimizer) to an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from test_engine_common import config_dict, make_cifar100
from topkd.config import Config
from topkd.engine import Trainer

METHODS = {
    "ofd": {"name": "ofd"},
    "crd": {"name": "crd", "nce_k": 8, "feat_dim": 16},
    "reviewkd": {"name": "reviewkd", "warmup": 2},
}


def _config(tmp, name, method):
    from topkd.checkpoints import save_weights
    from topkd.models import create_model

    ckpt = tmp / "teacher.pt"
    if not ckpt.is_file():
        make_cifar100(tmp / "data", n_train=32, n_test=8)
        torch.manual_seed(0)
        save_weights(create_model("resnet8", 100), ckpt)
    return Config.from_dict(config_dict(
        tmp, name=name, method=METHODS[method], model={"name": "resnet8"},
        teacher={"name": "resnet8", "checkpoint": str(ckpt)},
        data={"batch_size": 8, "eval_batch_size": 8, "augment": True},
        train={"epochs": 2, "max_steps_per_epoch": 2}))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_is_bit_exact(tmp_path, method):
    ref = Trainer(_config(tmp_path, "ref", method), "distill", quiet=True)
    init = {k: v.clone() for k, v in ref.method.state_dict().items()}
    ref.fit()
    trained = ref.method.state_dict()
    assert any(not torch.equal(init[k], trained[k]) for k in init)  # the modules learn
    if method == "crd":
        assert (trained["z"] > 0).all() and not torch.equal(init["memory_s"],
                                                            trained["memory_s"])

    cut = _config(tmp_path, "cut", method)
    assert Trainer(cut, "distill", quiet=True).fit(max_epochs=1) is None
    torch.manual_seed(999)  # the resumed run must not depend on the process' RNG state
    resumed = Trainer(cut, "distill", resume="auto", quiet=True)
    assert resumed.start_epoch == 2
    resumed.fit()
    a = torch.load(ref.ckpt_dir / "last.pt", weights_only=True)
    b = torch.load(resumed.ckpt_dir / "last.pt", weights_only=True)
    for part in ("model", "method"):
        assert a[part].keys() == b[part].keys() and a[part]
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for i, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_half_precision_features_are_upcast(method):
    """Features of an autocast (bf16) forward: the method upcasts them to its float32 modules
    (the same loss as from the upcast features) instead of failing on a dtype mismatch."""
    import copy

    from examples._zoo import zoo_example
    from topkd.methods import Batch, ModelOutput, params_from_dict

    torch.manual_seed(0)
    m, batch = zoo_example(params_from_dict(METHODS[method]))

    def cast(out, dtype):
        feats = {k: [t.detach().to(dtype) for t in v] if isinstance(v, list)
                 else v.detach().to(dtype) for k, v in out.feats.items()}
        return ModelOutput(out.logits.detach(), feats)

    def loss(dtype, final):
        b = Batch(cast(batch.student, dtype), cast(batch.teacher, dtype), batch.labels,
                  batch.epoch, batch.index)
        if final is not None:
            b = Batch(cast(b.student, final), cast(b.teacher, final), b.labels, b.epoch, b.index)
        torch.manual_seed(1)
        return copy.deepcopy(m)(b).total

    half = loss(torch.bfloat16, None)
    assert half.dtype == torch.float32 and torch.isfinite(half)
    assert torch.equal(half, loss(torch.bfloat16, torch.float32))


def test_dataset_labels_follow_subsets_and_index_wrappers(tmp_path):
    """MethodContext.train_labels as the trainer builds it (CRD's negatives): the labels of the
    training set in index order through val-split / train-subset Subsets and WithIndex."""
    from torch.utils.data import Subset

    from topkd.data import get_dataset
    from topkd.engine.data import WithIndex, dataset_labels

    make_cifar100(tmp_path / "data", n_train=32, n_test=8)
    ds = get_dataset("cifar100", tmp_path / "data", "train", augment=False)
    wrapped = WithIndex(Subset(Subset(ds, list(range(31, 1, -2))), [3, 0, 7, 7, 2]))
    got = dataset_labels(wrapped)
    assert got.tolist() == [int(wrapped[i][1]) for i in range(len(wrapped))]
    assert got.dtype == torch.long and len(set(got.tolist())) > 1
    assert dataset_labels(torch.utils.data.TensorDataset(torch.zeros(3))) is None
