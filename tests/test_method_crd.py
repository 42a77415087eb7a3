"""CRD against a line-by-line transcription of mdistiller's CRD (float64, two steps: loss,
gradients, Z, memory-bank momentum update), its contrast sampling (mdistiller's
CIFAR100InstanceSample), the bank under 2-process gloo DDP, checkpoints, and its configs.

Reference: megvii-research/mdistiller @ a08d46f10d6102bd6e3f258ca5ac880b020ea259,
``mdistiller/distillers/CRD.py``, ``mdistiller/dataset/cifar100.py``, ``mdistiller/engine/cfg.py``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import _reference as R
import topkd.methods.crd as crd_mod
from topkd.methods import Batch, MethodContext, ModelOutput, create_method
from topkd.methods.crd import (
    contrast_scores,
    memory_update,
    nce_loss,
    sample_contrast_indices,
)
from topkd.models import ClassifierModel, create_model

torch.set_num_threads(1)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ----------------------------------------------------------------- transcription of CRD.py
def ref_embed(linear, x):  # Embed.forward + Normalize(2)
    x = x.reshape(x.shape[0], -1)
    x = linear(x)
    norm = x.pow(2).sum(1, keepdim=True).pow(1.0 / 2)
    return x.div(norm)


def ref_contrast_loss(x, num_data):  # ContrastLoss.forward
    eps = 1e-7
    bsz = x.shape[0]
    m = x.size(1) - 1
    Pn = 1 / float(num_data)
    P_pos = x.select(1, 0)
    log_D1 = torch.div(P_pos, P_pos.add(m * Pn + eps)).log_()
    P_neg = x.narrow(1, 1, m)
    log_D0 = torch.div(P_neg.clone().fill_(m * Pn), P_neg.add(m * Pn + eps)).log_()
    loss = -(log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz
    return loss


class RefContrastMemory:
    """ContrastMemory with its buffers (``memory_v1``: student bank, ``memory_v2``: teacher)."""

    def __init__(self, memory_v1, memory_v2, K, T=0.07, momentum=0.5):
        self.K = K
        self.params = torch.tensor([K, T, -1, -1, momentum])
        self.memory_v1 = memory_v1
        self.memory_v2 = memory_v2

    def forward(self, v1, v2, y, idx=None):
        K = int(self.params[0].item())
        T = self.params[1].item()
        Z_v1 = self.params[2].item()
        Z_v2 = self.params[3].item()

        momentum = self.params[4].item()
        batchSize = v1.size(0)
        outputSize = self.memory_v1.size(0)
        inputSize = self.memory_v1.size(1)

        # sample
        weight_v1 = torch.index_select(self.memory_v1, 0, idx.view(-1)).detach()
        weight_v1 = weight_v1.view(batchSize, K + 1, inputSize)
        out_v2 = torch.bmm(weight_v1, v2.view(batchSize, inputSize, 1))
        out_v2 = torch.exp(torch.div(out_v2, T))
        # sample
        weight_v2 = torch.index_select(self.memory_v2, 0, idx.view(-1)).detach()
        weight_v2 = weight_v2.view(batchSize, K + 1, inputSize)
        out_v1 = torch.bmm(weight_v2, v1.view(batchSize, inputSize, 1))
        out_v1 = torch.exp(torch.div(out_v1, T))

        # set Z if haven't been set yet
        if Z_v1 < 0:
            self.params[2] = out_v1.mean() * outputSize
            Z_v1 = self.params[2].clone().detach().item()
        if Z_v2 < 0:
            self.params[3] = out_v2.mean() * outputSize
            Z_v2 = self.params[3].clone().detach().item()

        # compute out_v1, out_v2
        out_v1 = torch.div(out_v1, Z_v1).contiguous()
        out_v2 = torch.div(out_v2, Z_v2).contiguous()

        # update memory
        with torch.no_grad():
            l_pos = torch.index_select(self.memory_v1, 0, y.view(-1))
            l_pos.mul_(momentum)
            l_pos.add_(torch.mul(v1, 1 - momentum))
            l_norm = l_pos.pow(2).sum(1, keepdim=True).pow(0.5)
            updated_v1 = l_pos.div(l_norm)
            self.memory_v1.index_copy_(0, y, updated_v1)

            ab_pos = torch.index_select(self.memory_v2, 0, y.view(-1))
            ab_pos.mul_(momentum)
            ab_pos.add_(torch.mul(v2, 1 - momentum))
            ab_norm = ab_pos.pow(2).sum(1, keepdim=True).pow(0.5)
            updated_v2 = ab_pos.div(ab_norm)
            self.memory_v2.index_copy_(0, y, updated_v2)

        return out_v1, out_v2


def ref_forward_train(embed_s, embed_t, contrast, cfg, num_data, logits_student, target,
                      f_s, f_t, index, contrastive_index):
    loss_ce = cfg["LOSS"]["CE_WEIGHT"] * F.cross_entropy(logits_student, target)
    v_s = ref_embed(embed_s, f_s)
    v_t = ref_embed(embed_t, f_t)
    out_s, out_t = contrast.forward(v_s, v_t, index, contrastive_index)
    crd = ref_contrast_loss(out_s, num_data) + ref_contrast_loss(out_t, num_data)
    return loss_ce + (cfg["LOSS"]["FEAT_WEIGHT"] * crd).sum()


# ----------------------------------------------------------------- helpers
class Net(ClassifierModel):
    """BN-free conv net with a ``pooled_feat`` tap (the classifier input)."""

    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, stride=4, padding=1)
        self.fc = nn.Linear(width, num_classes)
        self.feature_dim = width

    def forward_features(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))

    def get_classifier(self):
        return self.fc


N, LABELS = 30, torch.arange(30) % 3  # 3 classes of 10 samples


def _ctx(ds=8, dt=12, n=N, labels=LABELS):
    return MethodContext(10, Net(10, ds), Net(10, dt), (3, 8, 8), num_samples=n,
                         train_labels=labels)


@pytest.fixture
def recorded(monkeypatch):
    """The contrast sets the method draws, as the reference's dataset would hand them over."""
    seen = []

    def record(*a, **kw):
        out = sample_contrast_indices(*a, **kw)
        seen.append(out)
        return out

    monkeypatch.setattr(crd_mod, "sample_contrast_indices", record)
    return seen


# ----------------------------------------------------------------- the loss and the bank
@pytest.mark.parametrize("mode, dense", [("exact", True), ("relax", True), ("exact", False)])
def test_two_steps_equal_reference_float64(recorded, mode, dense):
    cfg = R.mdistiller("configs/cifar100/crd.yaml")["CRD"]
    # momentum 0.7, not the default 0.5: m and 1 - m must not be interchangeable here
    spec = {"name": "crd", "nce_k": 7, "feat_dim": 16, "mode": mode, "nce_momentum": 0.7}
    torch.manual_seed(0)
    method = create_method(spec, _ctx()).double()
    assert method.dense  # N = 30 <= 16 (K + 1): the whole-bank GEMM; also check the gather
    method.dense = dense
    ref = RefContrastMemory(method.memory_s.clone(), method.memory_t.clone(), 7,
                            cfg["NCE"]["TEMPERATURE"], 0.7)
    g = torch.Generator().manual_seed(1)
    for step, index in enumerate((torch.tensor([0, 4, 8, 13, 17, 22]),
                                  torch.tensor([4, 5, 9, 13, 29, 1]))):  # revisits 4 and 13
        y = LABELS[index]
        f_s = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
        f_t = torch.randn(6, 12, generator=g, dtype=torch.float64)
        logits = torch.randn(6, 10, generator=g, dtype=torch.float64, requires_grad=True)
        batch = Batch(ModelOutput(logits, {"pooled_feat": f_s}),
                      ModelOutput(torch.zeros(6, 10), {"pooled_feat": f_t}), y, epoch=1,
                      index=index)
        got = method(batch).total
        cidx = recorded[-1]
        assert cidx.shape == (6, 8)
        want = ref_forward_train(method.embed_s.linear, method.embed_t.linear, ref, cfg, N,
                                 logits, y, f_s, f_t, index, cidx)
        assert torch.allclose(got, want, rtol=1e-6, atol=0), (step, got, want)
        inputs = [f_s, logits, *method.parameters()]
        for a, b in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
            # 1e-6 of the gradient's scale: the reference keeps T and Z in float32
            assert (a - b).abs().max() <= 1e-6 * b.abs().max(), step
        # Z, then the momentum update of the visited rows (and only those)
        assert torch.allclose(method.z.double(), ref.params[2:4].double(), rtol=1e-6)
        assert torch.allclose(method.memory_s, ref.memory_v1.double(), rtol=1e-6, atol=1e-7)
        assert torch.allclose(method.memory_t, ref.memory_v2.double(), rtol=1e-6, atol=1e-7)


def test_dense_and_gathered_scores_agree():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    mem = torch.randn(40, 8, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 40, (5, 9), generator=g)
    a = contrast_scores(v, mem, idx, 0.5, dense=True)
    b = contrast_scores(v, mem, idx, 0.5, dense=False)
    assert torch.allclose(a, b, rtol=1e-12)
    (ga,) = torch.autograd.grad(a.sum(), v)
    (gb,) = torch.autograd.grad(b.sum(), v)
    assert torch.allclose(ga, gb, rtol=1e-12)
    assert create_method("crd", _ctx()).dense  # 30 <= 16 * 16385
    big = _ctx(n=40, labels=torch.arange(40) % 3)
    assert not create_method({"name": "crd", "nce_k": 1}, big).dense  # 40 > 16 * 2


def test_memory_update_is_the_reference_momentum_formula():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 4, generator=g, dtype=torch.float64)
    v = F.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    for m in (0.0, 0.5, 0.9):
        l_pos = rows.clone()
        l_pos.mul_(m)
        l_pos.add_(torch.mul(v, 1 - m))
        want = l_pos.div(l_pos.pow(2).sum(1, keepdim=True).pow(0.5))
        assert torch.allclose(memory_update(rows, v, m), want, rtol=1e-12)


def test_nce_loss_equals_reference():
    x = torch.rand(5, 9, dtype=torch.float64) * 3
    assert torch.allclose(nce_loss(x, 1000), ref_contrast_loss(x, 1000).squeeze(), rtol=1e-9)


def test_initial_modules_and_bank_equal_the_reference_construction():
    """Same global-RNG draws in the same order (embed_s, embed_t, memory_v1, memory_v2) as
    mdistiller's CRD.__init__ / ContrastMemory.__init__: the same initial weights and banks."""
    ctx = _ctx()
    torch.manual_seed(5)
    method = create_method({"name": "crd", "feat_dim": 16}, ctx)
    torch.manual_seed(5)
    lin_s, lin_t = nn.Linear(8, 16), nn.Linear(12, 16)
    stdv = 1.0 / math.sqrt(16 / 3)
    m1 = torch.rand(N, 16).mul_(2 * stdv).add_(-stdv)
    m2 = torch.rand(N, 16).mul_(2 * stdv).add_(-stdv)
    assert torch.equal(method.embed_s.linear.weight, lin_s.weight)
    assert torch.equal(method.embed_t.linear.bias, lin_t.bias)
    assert torch.equal(method.memory_s, m1) and torch.equal(method.memory_t, m2)
    assert method.z.tolist() == [-1.0, -1.0]
    sd = method.state_dict()
    assert {"memory_s", "memory_t", "z"} <= set(sd) and "train_labels" not in sd


# ----------------------------------------------------------------- sampling
def test_exact_sampling_draws_other_class_negatives_without_replacement():
    labels = torch.arange(40) % 4  # 30 other-class samples per class
    index = torch.tensor([0, 1, 2, 3, 7, 13])
    torch.manual_seed(0)
    a = sample_contrast_indices(index, labels[index], labels, 20)
    torch.manual_seed(0)
    b = sample_contrast_indices(index, labels[index], labels, 20)
    assert torch.equal(a, b)  # driven by the torch RNG
    assert a.shape == (6, 21) and torch.equal(a[:, 0], index)
    neg = a[:, 1:]
    assert (labels[neg] != labels[index][:, None]).all()  # other classes only
    assert all(len(set(r.tolist())) == 20 for r in neg)  # without replacement (30 >= 20)
    g = torch.Generator().manual_seed(3)
    c = sample_contrast_indices(index, labels[index], labels, 20, generator=g)
    assert not torch.equal(c, a)


def test_sampling_with_replacement_when_the_pool_is_small_and_relax_positives():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 2)  # class 0 has 5 others, class 1 has 12
    index = torch.tensor([0, 1, 10, 13])
    torch.manual_seed(0)
    a = sample_contrast_indices(index, labels[index], labels, 8, mode="relax")
    assert (labels[a[:, 1:]] != labels[index][:, None]).all()
    assert len(set(a[2, 1:].tolist())) == 8  # class 1: 12 >= 8, no repeats
    assert len(set(a[0, 1:].tolist())) <= 5  # class 0: 5 < 8, with replacement
    assert (labels[a[:, 0]] == labels[index]).all()  # relax: a sample of the same class
    with pytest.raises(ValueError, match="no negatives"):
        sample_contrast_indices(index[:1], labels[:1], torch.zeros(5, dtype=torch.long), 3)


def test_sampling_is_uniform_over_other_classes():
    """np.random.choice(cls_negative[y], k, replace=False): every other-class sample equally
    likely, each row a uniform subset (checked by frequencies over many draws)."""
    labels = torch.arange(12) % 3
    rows = 20000
    index = torch.zeros(rows, dtype=torch.long)
    torch.manual_seed(0)
    a = sample_contrast_indices(index, labels[index], labels, 3)
    counts = torch.bincount(a[:, 1:].reshape(-1), minlength=12).float()
    others = labels != 0
    assert counts[~others].sum() == 0
    expected = rows * 3 / 8  # std ~0.9 % of it
    assert ((counts[others] - expected).abs() / expected).max() < 0.04
    # every one of the C(8, 3) = 56 subsets about equally often (expected 357, std ~19)
    sets = torch.sort(a[:, 1:], 1).values
    _, n_per_set = torch.unique(sets, dim=0, return_counts=True)
    assert len(n_per_set) == 56 and n_per_set.min() > 357 * 0.75 and n_per_set.max() < 357 * 1.25


# ----------------------------------------------------------------- errors
def test_missing_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="train_labels"):
        create_method("crd", MethodContext(10, Net(), Net(), (3, 8, 8), num_samples=N))
    with pytest.raises(ValueError, match="num_samples"):
        create_method("crd", MethodContext(10, Net(), Net(), (3, 8, 8)))
    method = create_method({"name": "crd", "nce_k": 4}, _ctx())
    f = {"pooled_feat": torch.randn(2, 8)}
    batch = Batch(ModelOutput(torch.randn(2, 10), f),
                  ModelOutput(torch.randn(2, 10), {"pooled_feat": torch.randn(2, 12)}),
                  torch.tensor([0, 1]), epoch=1)
    with pytest.raises(ValueError, match="batch.index"):
        method(batch)


# ----------------------------------------------------------------- DDP
def _ddp_worker(rank, world, tmp, port):
    import torch.distributed as dist

    from topkd.engine.step import TrainStep

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # as the trainer: the same seed on every rank
    ctx = _ctx()
    method = create_method({"name": "crd", "nce_k": 6, "feat_dim": 16}, ctx)
    step = TrainStep(ctx.student, ctx.teacher, method,
                     torch.optim.SGD([*ctx.student.parameters(), *method.parameters()], 0.1),
                     device=torch.device("cpu"), ddp=True)
    x, index = torch.load(Path(tmp) / "data.pt")
    half = x.shape[0] // world
    sl = slice(rank * half, (rank + 1) * half)
    step(x[sl], LABELS[index[sl]], epoch=1, index=index[sl])
    ignored = set(step.train_module.parameters_to_ignore)
    torch.save({"memory_s": method.memory_s, "memory_t": method.memory_t, "z": method.z,
                "ignored": sorted(ignored)}, Path(tmp) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_banks_stay_identical_and_equal_one_process(tmp_path):
    """2 gloo ranks, one TrainStep each: the banks (updated from all-gathered embeddings and
    indices) and Z are bitwise identical on both ranks and equal a single process stepping on
    the whole batch; index 4 is on both ranks (as DistributedSampler padding does): its row
    takes rank 0's embedding. DDP does not re-broadcast the banks."""
    import torch.multiprocessing as mp

    from topkd.engine.step import TrainStep

    torch.manual_seed(123)
    x = torch.randn(8, 3, 8, 8)
    index = torch.tensor([0, 4, 8, 13, 4, 22, 26, 2])
    torch.save((x, index), tmp_path / "data.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path), _free_port()), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in ("memory_s", "memory_t", "z"):
        assert torch.equal(r0[k], r1[k]), k
    assert {"method.memory_s", "method.memory_t", "method.z"} <= set(r0["ignored"])

    torch.manual_seed(0)
    ctx = _ctx()
    method = create_method({"name": "crd", "nce_k": 6, "feat_dim": 16}, ctx)
    step = TrainStep(ctx.student, ctx.teacher, method,
                     torch.optim.SGD([*ctx.student.parameters(), *method.parameters()], 0.1),
                     device=torch.device("cpu"))
    keep = torch.tensor([0, 1, 2, 3, 5, 6, 7])  # the single process sees index 4 once
    step(x[keep], LABELS[index[keep]], epoch=1, index=index[keep])
    assert torch.allclose(r0["memory_s"], method.memory_s, atol=1e-6)
    assert torch.allclose(r0["memory_t"], method.memory_t, atol=1e-6)
    # Z: the mean over ranks of the per-rank mean scores (negatives differ from one process)
    assert (r0["z"] > 0).all()


# ----------------------------------------------------------------- configs and sizes
def test_configs_equal_mdistiller():
    ref = R.mdistiller("configs/cifar100/crd.yaml")
    assert ref["DISTILLER"]["TYPE"] == "CRD"
    c = ref["CRD"]
    m = yaml.safe_load((CONFIGS / "methods" / "crd.yaml").read_text())["method"]
    assert (m["ce"], m["feat_weight"], m["feat_dim"], m["nce_k"], m["nce_t"],
            m["nce_momentum"], m["mode"]) == (
        c["LOSS"]["CE_WEIGHT"], c["LOSS"]["FEAT_WEIGHT"], c["FEAT"]["DIM"], c["NCE"]["K"],
        c["NCE"]["TEMPERATURE"], c["NCE"]["MOMENTUM"], c["MODE"])
    from topkd.methods.crd import CRDParams

    p = CRDParams()
    assert (p.ce, p.feat_weight, p.feat_dim, p.nce_k, p.nce_t, p.nce_momentum, p.mode) == \
        (1.0, 0.8, 128, 16384, 0.07, 0.5, "exact")
    from topkd.config import load_config

    for pair in ("r34_r18", "r50_mv1"):
        cfg = load_config(CONFIGS / "imagenet" / pair / "crd.yaml")
        iref = R.mdistiller(f"configs/imagenet/{pair}/crd.yaml")
        assert cfg.data.batch_size == iref["SOLVER"]["BATCH_SIZE"] == 256
        assert cfg.optim.lr == iref["SOLVER"]["LR"]
        assert cfg.method.nce_k == iref["CRD"]["NCE"]["K"]


@pytest.mark.parametrize("teacher, student, rel", [
    ("resnet32x4", "resnet8x4", "configs/cifar100/crd.yaml"),
    ("resnet34", "resnet18", "configs/imagenet/r34_r18/crd.yaml"),
    ("resnet50", "mobilenetv1", "configs/imagenet/r50_mv1/crd.yaml"),
])
def test_embedder_sizes_from_the_models_equal_mdistiller(teacher, student, rel):
    """STUDENT_DIM / TEACHER_DIM, which mdistiller configures per pair, come from the models."""
    big = teacher in ("resnet34", "resnet50")
    nc = 1000 if big else 100
    ctx = MethodContext(nc, create_model(student, nc), create_model(teacher, nc),
                        (3, 64, 64) if big else (3, 32, 32), num_samples=10,
                        train_labels=torch.arange(10) % 2)
    method = create_method({"name": "crd", "nce_k": 4}, ctx)
    feat = R.mdistiller(rel)["CRD"]["FEAT"]
    assert method.embed_s.linear.in_features == feat["STUDENT_DIM"]
    assert method.embed_t.linear.in_features == feat["TEACHER_DIM"]
    assert method.embed_s.linear.out_features == feat["DIM"]
