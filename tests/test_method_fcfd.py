"""FCFD against a transcription of the reference (model, paths, bridges, losses), resume.

Reference: LiuDongyang6/FCFD @ 2aefb7bc74ed81185c13e3fee350d36a9db8d250:
``classification/models/meta.py`` (``MetaModel``, ``GhostForward``, ``build_bridge``),
``classification/models/{resnet,ShuffleNetv1,vgg,mobilenetv2}.py`` (``stage_forward``,
``get_stage_module``, ``forward_classifier``, ``stage_input``) and ``classification/cifar/main.py``
(``train_one_epoch``: the loss of one batch, ``_loss_kl``, ``_get_loss_weight``). The reference's
models are transcribed as adapters on our zoo modules; ``random.sample`` is replaced by the given
paths.
"""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from test_stages import _fcfd_shufflev1_block
from topkd.methods import Batch, MethodContext, ModelOutput, create_method
from topkd.models import create_model
from topkd.models.features import FeatureTaps
from topkd.models.stages import frozen_bn_stats

torch.set_num_threads(1)


# --------------------------------------------------------------------------- reference models

class RefModel(nn.Module):
    """FCFD's model interface (``stage_forward`` ...) transcribed on one of our zoo models."""

    def __init__(self, name, m):
        super().__init__()
        self.name, self.m = name, m
        self.stage_input = {"resnet8": "afterrelu", "resnet8x4": "afterrelu",
                            "shufflev1": "beforerelu", "vgg8": "beforerelu",
                            "mobilenetv2": "beforerelu"}[name]
        self.n = 5 if name in ("vgg8", "mobilenetv2") else 4

    def forward(self, x):
        out = []
        for i in range(self.n):
            x = self.stage_forward(i, x)
            out.append(x)
        return out

    def stage_forward(self, stage, x):
        m, name = self.m, self.name
        if name.startswith("resnet"):  # resnet.py
            if stage == 0:
                return F.relu(m.bn1(m.conv1(x)))
            return getattr(m, f"layer{stage}")(x)
        if name == "shufflev1":  # ShuffleNetv1.py
            if stage == 0:
                return m.bn1(m.conv1(x))
            for blk in getattr(m, f"layer{stage}"):
                x = _fcfd_shufflev1_block(blk, x)
            return x
        if name == "vgg8":  # vgg.py
            if stage == 0:
                return m.block0(x)
            x = F.relu(x)
            if stage < 4:
                x = getattr(m, f"pool{stage - 1}")(x)
            return getattr(m, f"block{stage}")(x)
        if name == "mobilenetv2":  # mobilenetv2.py
            b = m.blocks
            if stage == 0:
                return m.conv1[1](m.conv1[0](x))
            if stage == 1:
                return b[1](b[0](F.relu(x)))
            if stage == 2:
                return b[2](x)
            if stage == 3:
                return b[4](b[3](x))
            return m.conv2[1](m.conv2[0](b[6](b[5](x))))
        raise AssertionError(name)

    def get_stage_module(self, stage):
        m, name = self.m, self.name
        if name.startswith("resnet") or name == "shufflev1":
            return nn.ModuleList([m.conv1, m.bn1]) if stage == 0 else getattr(m, f"layer{stage}")
        if name == "vgg8":
            if stage == 0:
                return m.block0
            return nn.ModuleList([getattr(m, f"pool{stage - 1}"), getattr(m, f"block{stage}")])
        b = m.blocks
        return [nn.ModuleList([m.conv1]), nn.ModuleList([b[0], b[1]]), nn.ModuleList([b[2]]),
                nn.ModuleList([b[3], b[4]]), nn.ModuleList([b[5], b[6], m.conv2])][stage]

    def forward_classifier(self, x):
        x = F.relu(x)
        x = F.adaptive_avg_pool2d(x, 1)
        x = x.view(x.shape[0], -1)
        return self.m.get_classifier()(x)


def _first_n(path, until_stage):
    assert isinstance(path, (str, list))
    if until_stage < 0:
        raise ValueError
    if isinstance(path, str):
        path = path.split('.')
    if until_stage == 0:
        return path[0]
    return '.'.join(path[:until_stage + 1])


def _is_pure(path_name):
    if path_name == '':
        return True
    lst = path_name.split('.')
    first = lst[0]
    return all(_ == first for _ in lst)


class GhostForward:
    def __init__(self, model, freeze_model=True, own_bn_trace=True, bn_mark='ghost', on=True):
        self.on, self.model, self.freeze_model = on, model, freeze_model
        self.own_bn_trace, self.bn_mark, self.frozen_by_me = own_bn_trace, bn_mark, []

    def __enter__(self):
        if not self.on:
            return
        if self.own_bn_trace:
            for m in self.model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    if not hasattr(m, 'ghost_dict'):
                        m.ghost_dict = {}
                    m.ghost_dict['main'] = {'running_mean': m.running_mean,
                                            'running_var': m.running_var,
                                            'num_batches_tracked': m.num_batches_tracked}
                    if self.bn_mark in m.ghost_dict:
                        ori_dict = m.ghost_dict[self.bn_mark]
                        m.running_mean = ori_dict['running_mean']
                        m.running_var = ori_dict['running_var']
                        m.num_batches_tracked = ori_dict['num_batches_tracked']
                    else:
                        m.running_mean = torch.zeros_like(m.running_mean)
                        m.running_var = torch.zeros_like(m.running_var)
                        m.num_batches_tracked = torch.zeros_like(m.num_batches_tracked)

    def __exit__(self, exc_type, exc_val, exc_tb):
        if not self.on:
            return
        if self.own_bn_trace:
            for m in self.model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.ghost_dict[self.bn_mark] = {'running_mean': m.running_mean,
                                                  'running_var': m.running_var,
                                                  'num_batches_tracked': m.num_batches_tracked}
                    m.running_mean = m.ghost_dict['main']['running_mean']
                    m.running_var = m.ghost_dict['main']['running_var']
                    m.num_batches_tracked = m.ghost_dict['main']['num_batches_tracked']


class RefMetaModel(nn.Module):
    """meta.py ``MetaModel`` (bridges built for every stage and pair, as the reference).

    One change, for the corrected ``teacher_bn: running`` only: a teacher in eval mode runs
    mixed paths on its own running statistics (the reference's per-path ghost statistics start
    at zero, which eval mode would read)."""

    def __init__(self, models, extra_type, input_size=(1, 3, 32, 32)):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.n_models = len(models)
        self.channels, self.shapes = [], []
        with torch.no_grad():
            for i in range(self.n_models):
                p0 = list(self.models[i].parameters())[0]
                demo_input = torch.zeros(input_size, dtype=p0.dtype)
                modes = [(mm, mm.training) for mm in self.models[i].modules()]
                with frozen_bn_stats(self.models[i]):
                    demo_output = self.models[i](demo_input)
                for mm, mode in modes:
                    mm.training = mode
                self.channels.append([_.shape[1] for _ in demo_output])
                self.shapes.append([_.shape[2] for _ in demo_output])
        self.n_stages = len(self.channels[0])
        self.default_paths = [[m_id] * self.n_stages for m_id in range(self.n_models)]
        self.bridges = [nn.ModuleList([nn.ModuleList([nn.Module() for _ in range(self.n_models)])
                                       for _ in range(self.n_models)])
                        for _ in range(self.n_stages)]
        for stage in range(1, self.n_stages):
            for m in range(self.n_models):
                for m_s in range(self.n_models):
                    if m_s == m:
                        continue
                    self.bridges[stage][m][m_s] = self.build_bridge(m_s, m, stage)
        self.bridges = nn.ModuleList(self.bridges)

    def forward(self, images, extra_paths, val=False):
        full_paths = self.default_paths + [list(p) for p in extra_paths]
        for i, p in enumerate(full_paths):
            full_paths[i] = [str(_) for _ in p]
        inters = [[{} for m in range(self.n_models)] for stage in range(self.n_stages)]
        for stage_idx in range(self.n_stages):
            for path_idx, path in enumerate(full_paths):  # noqa: B007 - as the reference
                m = int(path[stage_idx])
                if stage_idx == 0:
                    stage_input = images
                else:
                    stage_input = inters[stage_idx - 1][m][_first_n(path, stage_idx - 1)]
                out_feat_name = _first_n(path, stage_idx)
                out_is_pure = _is_pure(out_feat_name)
                if out_feat_name not in inters[stage_idx][m]:
                    ghost = not out_is_pure and (m != 0 or self.models[0].training)
                    with GhostForward(self.models[m].get_stage_module(stage_idx),
                                      freeze_model=False, own_bn_trace=True,
                                      bn_mark=out_feat_name, on=ghost):
                        output = self.models[m].stage_forward(stage_idx, stage_input)
                    inters[stage_idx][m][out_feat_name] = output
                    if out_is_pure and stage_idx != 0:
                        for other_m in range(self.n_models):
                            if other_m != m:
                                need_pass_bri = False
                                if other_m == 0:
                                    need_pass_bri = True
                                else:
                                    for p in full_paths[self.n_models:]:
                                        if _first_n(p, stage_idx) == out_feat_name and \
                                                int(p[stage_idx + 1]) == other_m:
                                            need_pass_bri = True
                                            break
                                if need_pass_bri:
                                    bridge = self.bridges[stage_idx][other_m][m]
                                    inters[stage_idx][other_m][out_feat_name] = bridge(output)
        outputs = []
        for path_idx, path in enumerate(full_paths):  # noqa: B007 - as the reference
            feat_name = '.'.join(path)
            m = path[-1]
            cls_input = inters[self.n_stages - 1][int(m)][feat_name]
            outputs.append(self.models[int(m)].forward_classifier(cls_input))
        return outputs, inters[1:]

    def build_bridge(self, m_s, m, stage):
        bridge = [
            torch.nn.Conv2d(self.channels[m_s][stage], self.channels[m][stage], kernel_size=3,
                            stride=1, padding=1, bias=False),
            nn.BatchNorm2d(self.channels[m][stage])]
        if self.shapes[m_s][stage] != self.shapes[m][stage]:
            if self.shapes[m_s][stage] == self.shapes[m][stage] * 2:
                bridge[0] = nn.Conv2d(self.channels[m_s][stage], self.channels[m][stage],
                                      kernel_size=3, stride=2, padding=1)
            elif self.shapes[m_s][stage] * 2 == self.shapes[m][stage]:
                bridge[0] = nn.ConvTranspose2d(self.channels[m_s][stage], self.channels[m][stage],
                                               kernel_size=4, stride=2, padding=1)
            else:
                raise NotImplementedError
        if self.models[m].stage_input == "afterrelu":
            bridge.append(nn.LeakyReLU(negative_slope=0.1))
        return nn.Sequential(*bridge)


def _get_loss_weight(loss_name, epoch, loss_config):
    weight_dict = loss_config[loss_name]
    cur_val = None
    for x, y in zip(weight_dict['x'], weight_dict['y']):
        if x <= epoch:
            cur_val = y
        else:
            break
    return cur_val


def _loss_kl(src, target, T=1):
    return F.kl_div(F.log_softmax(src / T, dim=1), F.softmax(target.detach() / T, dim=1),
                    reduction='batchmean') * T * T


def ref_total_loss(outputs, inters_all_stages, labels, epoch, config, batch):
    """main.py train_one_epoch: total_loss of one batch (model_num = 2)."""
    default_T, model_num = config["T"], 2
    total_loss = 0
    for stage in range(len(inters_all_stages)):
        is_final = stage == (len(inters_all_stages) - 1)
        inters = inters_all_stages[stage][0]
        inter_target = list(inters.values())[0].detach()
        loss_l2 = 0
        for val in list(inters.values())[1:]:
            loss_l2 += F.mse_loss(val, inter_target)
        if is_final:
            inter_target = F.adaptive_avg_pool2d(F.relu(inter_target), 1).view(batch, -1)
            for val in list(inters.values())[1:]:
                val = F.adaptive_avg_pool2d(F.relu(val), 1).view(batch, -1)
                loss_l2 += F.mse_loss(val, inter_target)
        if epoch < 20:
            loss_l2 = min(1, (epoch + 1) / 20) * loss_l2
        total_loss += loss_l2 * config["weight_l2"]
    for i, output in enumerate(outputs):
        loss_weights = (config["loss_teacher"] if i == 0 else
                        config["loss_student"] if i == 1 else config["loss_mixture"])
        loss_i, loss_label, kl_stu_weighted = 0, 0, 0
        label_weight = _get_loss_weight("label", epoch, loss_weights)
        if label_weight != 0:
            loss_label = F.cross_entropy(output, labels)
        for j in range(len(outputs)):
            if i != j:
                T = loss_weights['kl_student'][min(j, model_num)].get("T", default_T)
                weight = _get_loss_weight(min(j, model_num), epoch, loss_weights['kl_student'])
                if weight != 0:
                    kl_stu_weighted += _loss_kl(outputs[i], outputs[j], T) * weight
        loss_i += kl_stu_weighted
        loss_i += loss_label * label_weight
        total_loss += loss_i
    return total_loss


def ref_config(T, weight_l2, kd_w, mix_w, label_w=1.0):
    zero = {"x": [0], "y": [0]}
    return {
        "loss_teacher": {"label": zero, "kl_student": [zero, zero, zero]},
        "loss_student": {"label": {"x": [0], "y": [label_w]},
                         "kl_student": [{"x": [0], "y": [kd_w]}, zero, zero]},
        "loss_mixture": {"label": zero, "kl_student": [{"x": [0], "y": [mix_w]}, zero, zero]},
        "T": T, "weight_l2": weight_l2,
    }


def ref_path(n, direction, k):
    first, second = (0, 1) if direction == "t2s" else (1, 0)
    return [first] * (k + 1) + [second] * (n - k - 1)


# --------------------------------------------------------------------------- the comparison

def _models(student, teacher, nc=10):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        s, t = create_model(student, nc).double(), create_model(teacher, nc).double()
        for m in (s, t):  # non-trivial BatchNorm statistics
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.uniform_(-0.1, 0.1)
                    mod.running_var.uniform_(0.8, 1.2)
    return s, t


def _our_batch(method, s, t, x, y, epoch):
    s.train()
    t.eval()
    with FeatureTaps(s, method.student_taps) as taps:
        ls, fs = taps(x)
    with torch.no_grad(), frozen_bn_stats(t, batch_stats=method.teacher_bn_batch_stats), \
            FeatureTaps(t, method.teacher_taps) as taps:  # as the engine runs the teacher
        lt, ft = taps(x)
    return Batch(ModelOutput(ls, fs), ModelOutput(lt, ft), y, epoch=epoch)


CASES = [
    # student, teacher, paths, params, the reference's 0-based epoch (< 20: L2 warm-up)
    ("resnet8", "resnet8x4", [("s2t", 1), ("t2s", 2)], {}, 0),
    ("resnet8", "resnet8x4", [("t2s", 1), ("s2t", 2)], {"temperature": 8.0, "l2_weight": 0.02},
     25),
    # ShuffleNetV1 (pre-ReLU stages, maps half the teacher's: stride-2 / transposed bridges)
    ("shufflev1", "resnet8", [("s2t", 2), ("t2s", 1)], {"mix_weight": 0.2}, 3),
    # five stages; MobileNetV2's last boundary re-runs conv2; VGG pre-ReLU
    ("mobilenetv2", "vgg8", [("s2t", 1), ("t2s", 3), ("s2t", 3)],
     {"extra_paths": 3, "kd_weight": 0.5}, 25),
    # the corrected option: the teacher on its running statistics (the reference's code with
    # its teacher in eval mode)
    ("resnet8", "resnet8x4", [("s2t", 1), ("s2t", 2)], {"teacher_bn": "running"}, 0),
]


@pytest.mark.parametrize("student, teacher, paths, params, epoch0", CASES)
def test_loss_grads_and_bn_stats_match_reference(student, teacher, paths, params, epoch0):
    s, t = _models(student, teacher)
    ref_s, ref_t = RefModel(student, copy.deepcopy(s)), RefModel(teacher, copy.deepcopy(t))
    ctx = MethodContext(num_classes=10, student=s, teacher=t, input_size=(3, 32, 32))
    torch.manual_seed(3)
    m = create_method({"name": "fcfd", **params}, ctx).double().train()
    n = m.num_stages
    ref = RefMetaModel([ref_t, ref_s], "bi").double().train()  # the teacher in train mode too
    if params.get("teacher_bn") == "running":
        ref_t.eval()
    for i in range(1, n):  # our bridges' weights into the reference's (same layout)
        ref.bridges[i][0][1].load_state_dict(m.s2t[i - 1].state_dict())
    for j, k in enumerate(sorted({k for d, k in m.paths if d == "t2s"})):
        ref.bridges[k][1][0].load_state_dict(m.t2s[j].state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (2,), generator=g)

    m.sample_paths = lambda: paths
    got = m(_our_batch(m, s, t, x, y, epoch0 + 1)).total
    p = m.params
    outputs, inters = ref(x, [ref_path(n, d, k) for d, k in paths])
    want = ref_total_loss(outputs, inters, y, epoch0,
                          ref_config(p.temperature, p.l2_weight, p.kd_weight, p.mix_weight), 2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-10)

    ours = [*s.parameters(), *m.parameters()]
    theirs = [*ref_s.parameters()]
    for i in range(1, n):
        theirs += list(ref.bridges[i][0][1].parameters())
    for k in sorted({k for d, k in m.paths if d == "t2s"}):
        theirs += list(ref.bridges[k][1][0].parameters())
    assert len(ours) == len(theirs)
    g_ours = torch.autograd.grad(got, ours, allow_unused=True)
    g_theirs = torch.autograd.grad(want, theirs, allow_unused=True)
    for a, w in zip(g_ours, g_theirs):
        if a is None or w is None:
            assert a is None and w is None
            continue
        torch.testing.assert_close(a, w, rtol=1e-6, atol=1e-10)
    # running statistics: the student's and the bridges' move as the reference's main ones
    for (k, a), w in zip(s.state_dict().items(), ref_s.m.state_dict().values()):
        torch.testing.assert_close(a, w, msg=k)
    for i in range(1, n):
        for (k, a), w in zip(m.s2t[i - 1].state_dict().items(),
                             ref.bridges[i][0][1].state_dict().values()):
            torch.testing.assert_close(a, w, msg=f"s2t {i} {k}")


def test_sample_paths_are_distinct_candidates_drawn_uniformly():
    s, t = _models("resnet8", "resnet8")
    ctx = MethodContext(num_classes=10, student=s, teacher=t, input_size=(3, 32, 32))
    m = create_method("fcfd", ctx)
    assert m.paths == [("t2s", 1), ("t2s", 2), ("s2t", 1), ("s2t", 2)]  # the reference's list
    assert len(m.s2t) == 3 and len(m.t2s) == 2  # t2s bridges of stages 1, 2 (3 is never used)
    torch.manual_seed(0)
    counts: dict[tuple[str, int], int] = {}
    for _ in range(600):
        drawn = m.sample_paths()
        assert len(drawn) == 2 and drawn[0] != drawn[1]
        for p in drawn:
            counts[p] = counts.get(p, 0) + 1
    assert set(counts) == set(m.paths) and all(250 < c < 350 for c in counts.values())
    s2t = create_method({"name": "fcfd", "extra_type": "s2t"}, ctx)
    assert s2t.paths == [("s2t", 1), ("s2t", 2)] and len(s2t.t2s) == 0
    none = create_method({"name": "fcfd", "extra_paths": 0}, ctx)
    assert none.paths == [] and none.sample_paths() == [] and len(none.t2s) == 0


def test_errors_name_the_problem():
    from topkd.methods import ParamError

    s, t = _models("resnet8", "resnet8")
    ctx = MethodContext(num_classes=10, student=s, teacher=t, input_size=(3, 32, 32))
    with pytest.raises(ValueError, match=r"method.extra_paths=3: a 4-stage pair has 2 s2t paths"):
        create_method({"name": "fcfd", "extra_paths": 3, "extra_type": "s2t"}, ctx)
    with pytest.raises(ParamError, match="method.mix_weight=1.0 has no effect here"):
        create_method({"name": "fcfd", "extra_paths": 0, "mix_weight": 1.0}, ctx)
    with pytest.raises(ParamError, match="nothing is distilled"):
        create_method({"name": "fcfd", "extra_paths": 0, "kd_weight": 0, "l2_weight": 0})
    with pytest.raises(ValueError, match="fcfd runs parts of both networks"):
        create_method("fcfd")
    vgg = create_model("vgg8", 10)
    with pytest.raises(ValueError, match="the student has 4 stages, the teacher 5"):
        create_method("fcfd", MethodContext(num_classes=10, student=s, teacher=vgg,
                                            input_size=(3, 32, 32)))
    from topkd.methods.fcfd import fcfd_bridge

    with pytest.raises(ValueError, match="cannot bridge a 8x8 stage output to 2x2"):
        fcfd_bridge(4, 8, 4, 2, True)


def test_l2_ramp_and_pure_stage_l2():
    from topkd.methods.fcfd import fcfd_stage_l2

    s, t = _models("resnet8", "resnet8")
    ctx = MethodContext(num_classes=10, student=s, teacher=t, input_size=(3, 32, 32))
    m = create_method("fcfd", ctx)
    assert [m.l2_ramp(e) for e in (1, 10, 20, 30)] == [0.05, 0.5, 1.0, 1.0]
    assert create_method({"name": "fcfd", "l2_warmup": 0}, ctx).l2_ramp(None) == 1.0
    with pytest.raises(ValueError, match="epoch is required"):
        m.l2_ramp(None)
    g = torch.Generator().manual_seed(0)
    a, b, tt = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    want = F.mse_loss(a, tt) + F.mse_loss(b, tt)
    torch.testing.assert_close(fcfd_stage_l2([a, b], tt, final=False), want)
    gap = lambda z: F.relu(z).mean(dim=(2, 3))  # noqa: E731
    torch.testing.assert_close(fcfd_stage_l2([a, b], tt, final=True),
                               want + F.mse_loss(gap(a), gap(tt)) + F.mse_loss(gap(b), gap(tt)))


def test_resume_is_bit_exact(tmp_path):
    """Bridges, their BatchNorm statistics and the paths drawn (torch's generator) resume."""
    from feature_engine_common import assert_resume_bit_exact

    state = assert_resume_bit_exact(tmp_path, {"name": "fcfd"})
    assert any(k.startswith("t2s.") for k in state["method"])


# --------------------------------------------------------------------------- configs

FIX = Path(__file__).resolve().parent / "fixtures" / "reference" / "fcfd"
# Our pair keys -> FCFD's experiment names (<student>-<teacher>).
FCFD_PAIR = {
    "res32x4_res8x4": "resnet8x4-resnet32x4", "res56_res20": "resnet20-resnet56",
    "wrn40_2_wrn16_2": "wrn_16_2-wrn_40_2", "wrn40_2_wrn40_1": "wrn_40_1-wrn_40_2",
    "vgg13_vgg8": "vgg8-vgg13", "res32x4_shuv1": "ShuffleV1-resnet32x4",
    "wrn40_2_shuv1": "ShuffleV1-wrn_40_2", "vgg13_mv2": "MobileNetV2-vgg13",
    "res50_mv2": "MobileNetV2-ResNet50", "res32x4_shuv2": "ShuffleV2-resnet32x4",
    "r34_r18": "resnet18IN-resnet34IN", "r50_mv1": "MBIN-resnet50IN",
}


def _script_args(path: Path) -> dict[str, str]:
    argv = shlex.split(path.read_text().replace("\\\n", " "))
    return {a.split("=")[0]: a.split("=", 1)[1] if "=" in a else argv[i + 1]
            for i, a in enumerate(argv) if a in ("--init_lr", "--batch_size")}


def _expected_method(exp: dict, main: dict) -> dict:
    """The method section an experiment yaml + main.py's defaults give, after checking that every
    weight FCFD's reduced parameters leave out is zero in the file."""
    def const(w):  # a weight schedule {x: [0], y: [v]}: constant v
        assert w["x"] == [0] and len(w["y"]) == 1 and "T" not in w
        return float(w["y"][0])

    lt, ls, lm = exp["loss_teacher"], exp["loss_student"], exp["loss_mixture"]
    assert const(lt["label"]) == 0 and all(const(w) == 0 for w in lt["kl_student"])
    assert const(ls["kl_student"][1]) == 0 and const(ls["kl_student"][2]) == 0
    assert const(lm["label"]) == 0
    assert const(lm["kl_student"][1]) == 0 and const(lm["kl_student"][2]) == 0
    a = main["argparse"]
    return {"name": "fcfd", "ce": const(ls["label"]), "kd_weight": const(ls["kl_student"][0]),
            "mix_weight": const(lm["kl_student"][0]), "temperature": float(exp["T"]),
            "l2_weight": float(exp["weight_l2"]), "l2_warmup": float(main["l2_warmup_epochs"]),
            "extra_paths": a["extra_paths"], "extra_type": a["extra_type"],
            "teacher_bn": "batch"}


@pytest.mark.parametrize("dataset, folder", [("cifar100", "cifar"), ("imagenet", "IN")])
def test_configs_equal_the_reference(dataset, folder):
    """Every leaf: its experiment yaml (method values), main.py's defaults (solver, paths, L2
    warm-up) and the README's train script (lr, batch size); res110_res32 has no FCFD values."""
    from test_configs import CONFIGS, GEN, compose

    main = yaml.safe_load((FIX / "main_args.yaml").read_text())[folder]
    a = main["argparse"]
    pairs = GEN.CIFAR_PAIRS if dataset == "cifar100" else GEN.IMAGENET_PAIRS
    leaves = sorted((CONFIGS / dataset).glob("*/fcfd.yaml"))
    assert {p.parent.name for p in leaves} == {p.key for p in pairs} - {"res110_res32"}
    for p in leaves:
        name = FCFD_PAIR[p.parent.name]
        exp = yaml.safe_load((FIX / "experiments" / folder / f"{name}.yaml").read_text())
        cfg = compose(p)
        assert cfg["method"] == _expected_method(exp, main), p
        script = _script_args(FIX / "experiments" / folder / main["readme_experiments"][name])
        o, s = cfg["optim"], cfg["sched"]
        assert (o["lr"], cfg["data"]["batch_size"]) == (float(script["--init_lr"]),
                                                        int(script["--batch_size"])), p
        assert (o["momentum"], o["weight_decay"], o["nesterov"]) == (
            a["momentum"], a["weight_decay"], a["nesterov"])
        assert a["scheduler"] == "step" and s["name"] == "multistep" and s["gamma"] == a["gamma"]
        assert cfg["train"]["epochs"] == a["epochs"]
        assert s["milestones"] == main["milestones"][a["epochs"]]
    assert "res110_res32" in GEN._pair_overrides("fcfd")["unsupported"]


def test_ddp_steps_with_undrawn_paths(tmp_path, monkeypatch):
    """Under DDP the bridges of paths not drawn get no gradient: the method declares
    ddp_find_unused_parameters, without which DDP fails at the next step (gloo, one process)."""
    import torch.distributed as dist

    from topkd.engine.step import TrainStep
    from topkd.methods.fcfd import FCFD

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        def run(find_unused: bool) -> None:
            monkeypatch.setattr(FCFD, "ddp_find_unused_parameters", find_unused)
            s, t = _models("resnet8", "resnet8")
            s, t = s.float(), t.float().eval().requires_grad_(False)
            m = create_method("fcfd", MethodContext(num_classes=10, student=s, teacher=t,
                                                    input_size=(3, 32, 32)))
            opt = torch.optim.SGD([*s.parameters(), *m.parameters()], lr=0.01)
            step = TrainStep(s, t, m, opt, device=torch.device("cpu"), ddp=True)
            x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
            for paths in ([("s2t", 1), ("s2t", 2)], [("t2s", 1), ("s2t", 1)],
                          [("t2s", 2), ("s2t", 2)]):
                m.sample_paths = lambda p=paths: p
                out, _ = step(x, y, epoch=1)
                assert torch.isfinite(out.total)

        run(True)
        with pytest.raises(RuntimeError, match="did not receive grad|finished reduction"):
            run(False)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("teacher_bn", ["batch", "running"])
def test_engine_runs_the_teacher_as_the_reference(teacher_bn):
    """teacher_bn: batch -> the teacher's logits and features come from BatchNorm on the batch's
    statistics (the reference's frozen teacher in train mode), its running statistics kept."""
    from topkd.engine.step import TrainStep

    s, t = _models("resnet8", "resnet8")
    s, t = s.float(), t.float().eval().requires_grad_(False)
    m = create_method({"name": "fcfd", "teacher_bn": teacher_bn},
                      MethodContext(num_classes=10, student=s, teacher=t, input_size=(3, 32, 32)))
    seen = {}
    real = m.distill

    def distill(batch, terms):  # record what the engine gave the method
        seen["t"] = batch.teacher.logits
        return real(batch, terms)

    m.distill = distill
    opt = torch.optim.SGD([*s.parameters(), *m.parameters()], lr=0.01)
    stats = {k: v.clone() for k, v in t.state_dict().items()}
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    TrainStep(s, t, m, opt, device=torch.device("cpu"))(x, y, epoch=1)
    with torch.no_grad(), frozen_bn_stats(t, batch_stats=teacher_bn == "batch"):
        want = t(x)
    torch.testing.assert_close(seen["t"], want)
    for k, v in t.state_dict().items():
        assert torch.equal(v, stats[k]), k
