"""The speed switches (topkd.engine.speed): auto rules, compiled == eager, eager fallback,
checkpoints across compiled and eager runs.

Compiling with inductor costs 15-100 s per graph on the 2-core CI box, so these tests compile
with ``aot_eager`` (dynamo's graph capture and AOTAutograd's joint forward/backward graph, the
parts that break on a method's Python-side logic, without code generation) or ``eager``
(capture only), except one: TopKD's step through inductor's generated C++ code on the tiniest
pair (about a minute), so that what ``train.compile=true`` really runs is compared too.
"""

from __future__ import annotations

import json
import logging
from unittest import mock

import pytest
import torch
from torch import nn

import topkd.engine.speed as speed
from test_engine_common import tiny_config, tinynet_registered  # noqa: F401
from topkd.config import Config, ConfigError
from topkd.engine.speed import (
    CompiledOrEager,
    resolve_amp,
    resolve_channels_last,
    resolve_compile,
)
from topkd.engine.step import build_train_step
from topkd.methods import create_method
from topkd.models import create_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
# Stated tolerance of compiled vs eager training (float32; reassociated sums of a few ULPs,
# grown over 3 SGD steps).
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(autouse=True)
def quiet_compile_trace():
    """torch gives its structured-trace logger pytest's capture handlers, which then format
    every traced graph at DEBUG level (3-4x the compile time of these tests): raise its level."""
    log = logging.getLogger("torch.__trace")
    level = log.level
    log.setLevel(logging.INFO)
    yield
    log.setLevel(level)


@pytest.fixture
def backend(request):
    name = getattr(request, "param", "aot_eager")
    with mock.patch.dict(speed.COMPILE_OPTIONS, {"backend": name}):
        torch._dynamo.reset()
        yield name
    torch._dynamo.reset()


# --------------------------------------------------------------------------- auto rules


def test_auto_rules():
    assert resolve_amp("auto", CPU) is None and resolve_amp("none", CUDA) is None
    with mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        assert resolve_amp("auto", CUDA) is torch.bfloat16
    with mock.patch("torch.cuda.is_bf16_supported", return_value=False):
        assert resolve_amp("auto", CUDA) is None  # e.g. pre-Ampere: fp32, not fp16
    assert resolve_amp("fp16", CUDA) is torch.float16 and resolve_amp("fp16", CPU) is None
    assert resolve_amp("bf16", CPU) is torch.bfloat16  # explicit: CPU autocast
    conv, mlp = create_model("resnet8", 10), nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    assert resolve_channels_last("auto", conv, None) is True
    assert resolve_channels_last("auto", mlp, conv) is True  # a convolutional teacher
    assert resolve_channels_last("auto", mlp, None) is False
    assert resolve_channels_last(False, conv) is False and resolve_channels_last(True, mlp)
    assert resolve_compile("auto", CPU) is False and resolve_compile("auto", CUDA) is True
    assert resolve_compile(True, CPU) is True and resolve_compile(False, CUDA) is False


def test_defaults_are_auto_and_validated():
    t = Config().train
    assert (t.amp, t.channels_last, t.compile) == ("auto", "auto", "auto")
    assert Config().data.loader == "auto"
    for key, bad in (("compile", "maybe"), ("channels_last", "yes"), ("amp", "fp8")):
        with pytest.raises(ConfigError, match=f"'train.{key}'"):
            Config.from_dict({"train": {key: bad}})
    assert Config.from_dict({"train": {"compile": True, "channels_last": False}}).train.compile


def test_channels_last_default_converts_models_and_inputs():
    cfg = Config.from_dict({"method": {"name": "kd"}})
    s, t = create_model("resnet8", 10), create_model("resnet8", 10).eval()
    m = create_method(cfg.method, num_classes=10)
    step = build_train_step(cfg, s, t, m, CPU)
    assert step.channels_last and step.amp_dtype is None and not step.compiled
    w = s.conv1.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert t.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    s.register_forward_pre_hook(lambda mod, a: seen.append(a[0]))
    step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), epoch=1)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)


def test_explicit_bf16_runs_on_the_cpu_and_fp16_is_refused_there():
    def step(amp):
        cfg = Config.from_dict({"method": {"name": "kd"}, "train": {"amp": amp}})
        s, t = create_model("test_tinynet", 10), create_model("test_tinynet", 10).eval()
        return build_train_step(cfg, s, t, create_method(cfg.method, num_classes=10), CPU)

    st = step("bf16")
    assert st.amp_dtype is torch.bfloat16 and not st.scaler.is_enabled()
    out, logits = st(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]), epoch=1)
    assert logits.dtype is torch.bfloat16  # the student ran under CPU autocast
    assert out.total.dtype is torch.float32  # the method's loss is computed in fp32
    with pytest.warns(UserWarning, match="train.amp=fp16 ignored on cpu"):
        assert step("fp16").amp_dtype is None


# --------------------------------------------------------------------------- fallback


@pytest.mark.parametrize("backend", ["eager"], indirect=True)
def test_compiled_or_eager_falls_back_once_with_a_notice(backend, capsys):
    calls = []

    def fn(x):
        calls.append(1)
        y = x * 2
        torch._dynamo.graph_break()  # not one graph: fullgraph=True refuses to compile it
        return y + 1

    c = CompiledOrEager(fn, "the test function")
    x = torch.arange(3.0)
    assert torch.equal(c(x), x * 2 + 1) and not c.is_compiled
    assert len(calls) == 1  # dynamo failed before running anything; then one eager call
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("topkd: notice: torch.compile of the test "
                                              "function failed (") and "eagerly" in err[0]
    assert torch.equal(c(x), x * 2 + 1)
    assert capsys.readouterr().err == ""  # no second notice


@pytest.mark.parametrize("backend", ["eager"], indirect=True)
def test_compiled_or_eager_keeps_real_errors(backend, capsys):
    lin = nn.Linear(3, 2)
    c = CompiledOrEager(lin, "the linear layer")
    assert c._orig_mod is lin  # FeatureTaps hook the raw module
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        c(torch.randn(2, 4))  # the eager call raises the model's own error
    assert c.is_compiled and "topkd: notice" not in capsys.readouterr().err
    x = torch.randn(2, 3)
    assert torch.equal(c(x), lin(x))


# --------------------------------------------------------------------------- compiled == eager


def _steps(method: dict, compile_: bool, n: int = 3, pair=("test_tinynet", "test_tinynet"),
           shape=(3, 16, 16)):
    """``n`` training steps of a fresh seeded student/teacher pair: (step, per-step loss terms,
    the student's state_dict, the method's state_dict). Epochs 3, 4, ...: with TopKD's
    ``warmup: 20`` the warm-up factor (outside the compiled graphs) differs at every step."""
    from topkd.methods import MethodContext

    torch.manual_seed(0)
    cfg = Config.from_dict({"method": method, "train": {"compile": compile_}})
    s, t = create_model(pair[0], 10), create_model(pair[1], 10).eval().requires_grad_(False)
    ctx = MethodContext(num_classes=10, student=s, teacher=t, input_size=shape, num_samples=32,
                        train_labels=torch.arange(32) % 10)
    m = create_method(cfg.method, ctx)
    m.validate = False
    step = build_train_step(cfg, s, t, m, CPU)
    g = torch.Generator().manual_seed(1)
    losses = []
    for i in range(n):
        x = torch.randn(8, *shape, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        index = torch.randperm(32, generator=g)[:8] if m.needs_index else None
        out, logits = step(x, y, epoch=3 + i, index=index)
        losses.append(torch.stack([out.total.detach(), *out.terms.values()]))
    return step, torch.stack(losses), s.state_dict(), m.state_dict()


def _assert_close_dicts(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()  # no _orig_mod. prefixes
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=k)


def _assert_compiled_equals_eager(method: dict, **kw) -> None:
    eager, l_e, sd_e, m_e = _steps(method, False, **kw)
    comp, l_c, sd_c, m_c = _steps(method, True, **kw)
    assert len(comp.compiled) == 4 and all(c.is_compiled for c in comp.compiled), \
        [c.error for c in comp.compiled]  # student, task_loss, distill, teacher: none fell back
    torch.testing.assert_close(l_c, l_e, rtol=RTOL, atol=ATOL)
    _assert_close_dicts(sd_c, sd_e)
    _assert_close_dicts(m_c, m_e)  # the method's connectors / buffers


FMNIST = {"pair": ("fmnist_cnn_student", "fmnist_cnn_teacher"), "shape": (1, 28, 28)}
RESNETS = {"pair": ("resnet8", "resnet8"), "shape": (3, 16, 16)}


@pytest.mark.parametrize("method", [{"name": "kd"}, {"name": "topkd", "warmup": 20.0}],
                         ids=["kd", "topkd"])
def test_compiled_step_equals_eager(backend, method):
    _assert_compiled_equals_eager(method)


@pytest.mark.parametrize("backend", ["eager"], indirect=True)
def test_compiled_feature_method_equals_eager(backend):
    """OFD: student and teacher feature taps through the compiled models, trainable
    connectors, BatchNorm buffers in the method."""
    _assert_compiled_equals_eager({"name": "ofd"}, n=2, **RESNETS)


def test_a_method_that_cannot_compile_falls_back_alone(backend, capsys):
    """CRD's distill draws its negatives with a torch.Generator and updates its memory bank in
    place: dynamo refuses it, that part runs eagerly (with a notice), the rest stays compiled,
    and the bank sees each update exactly once."""
    eager, l_e, sd_e, m_e = _steps({"name": "crd"}, False, n=2, **FMNIST)
    comp, l_c, sd_c, m_c = _steps({"name": "crd"}, True, n=2, **FMNIST)
    state = {c.name: c.is_compiled for c in comp.compiled}
    assert state == {"the student": True, "the crd method's task_loss": True,
                     "the crd method's distill": False, "the teacher": True}
    notices = [ln for ln in capsys.readouterr().err.splitlines() if "topkd: notice" in ln]
    assert len(notices) == 1 and "the crd method's distill" in notices[0]
    torch.testing.assert_close(l_c, l_e, rtol=RTOL, atol=ATOL)
    _assert_close_dicts(m_c, m_e)  # memory banks included


def test_inductor_step_equals_eager():
    """The default backend (inductor, generated code): TopKD's top-k scaling, sums reassociated
    by the code generator, within the stated tolerance of eager after 3 steps."""
    torch._dynamo.reset()
    try:
        _assert_compiled_equals_eager({"name": "topkd", "warmup": 20.0})
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("backend", ["eager"], indirect=True)
def test_checkpoints_move_between_compiled_and_eager_runs(backend, tmp_path):
    from topkd.engine import Trainer

    def cfg(compile_):
        return tiny_config(tmp_path, train={"epochs": 2, "compile": compile_})

    ref = Trainer(cfg(False), "train", tmp_path / "eager", quiet=True)
    ref.fit()
    for first, then in ((False, True), (True, False)):
        run = tmp_path / f"{first}-{then}"
        a = Trainer(cfg(first), "train", run, quiet=True)
        assert bool(a.step.compiled) is first
        a.fit(max_epochs=1)
        keys = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"].keys()
        assert list(keys) == list(ref.model.state_dict())  # no _orig_mod. prefixes
        b = Trainer(cfg(then), "train", run, resume="auto", quiet=True)
        assert b.start_epoch == 2 and bool(b.step.compiled) is then
        b.fit()
        assert all(c.is_compiled for c in b.step.compiled)
        env = json.loads((run / "env.json").read_text())  # each leg records its own switches
        assert bool(env["speed"]["compiled"]) is first
        assert bool(env["resumes"][0]["speed"]["compiled"]) is then
        sd, want = b.model.state_dict(), ref.model.state_dict()
        for k in want:
            torch.testing.assert_close(sd[k], want[k], rtol=RTOL, atol=ATOL)


def test_bench_reports_what_the_switches_resolved_to(capsys):
    """topkd.engine.bench (the GPU command of docs/benchmarks.md), on the CPU."""
    from topkd.engine.bench import main, step_throughput

    kw = dict(batch=4, steps=1, warmup=1, size=16, num_classes=10)
    r = step_throughput("test_tinynet", "test_tinynet", "kd", cached=True, **kw)
    assert r["cached"] and (r["amp"], r["channels_last"], r["compiled"]) == ("none", True, [])
    assert r["first_step_s"] > 0 and r["images_per_s"] > 0
    r = step_throughput("test_tinynet", "test_tinynet", "kd", channels_last=False, amp="bf16",
                        **kw)
    assert (r["amp"], r["channels_last"], r["cached"]) == ("bfloat16", False, False)
    main(["--teacher", "test_tinynet", "--student", "test_tinynet", "--batch", "4", "--steps",
          "1", "--warmup", "1", "--size", "16", "--num-classes", "10", "--compare-amp",
          "--channels-last", "off"])
    lines = [json.loads(s) for s in capsys.readouterr().out.strip().splitlines()]
    assert [v.get("amp") for v in lines[:2]] == ["none", "bfloat16"]
    ratio = lines[2]["bf16_over_fp32"]
    assert ratio == pytest.approx(lines[1]["images_per_s"] / lines[0]["images_per_s"])
