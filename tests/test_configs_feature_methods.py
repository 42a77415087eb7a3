"""The CIFAR-100 configs of FitNet, AT, RKD, PKT, SP, NST, KDSVD and VID against mdistiller's
``configs/cifar100/<method>.yaml`` resolved with its ``cfg.py`` defaults (verbatim fixtures in
tests/fixtures/reference/mdistiller, commit a08d46f10d6102bd6e3f258ca5ac880b020ea259)."""

from __future__ import annotations

import inspect

import pytest

import _reference as R
from test_configs import CONFIGS, GEN, compose
from topkd.methods import params_from_dict

PAIRS = [p.key for p in GEN.CIFAR_PAIRS]


def _expected(method: str) -> dict:
    """Our method section, read off mdistiller's resolved config."""
    ref = R.mdistiller(f"configs/cifar100/{method}.yaml")
    assert ref["DISTILLER"]["TYPE"] == method.upper()
    c = ref[method.upper()]
    out = {"name": method, "ce": c["LOSS"]["CE_WEIGHT"], "feat_weight": c["LOSS"]["FEAT_WEIGHT"]}
    if method == "fitnet":
        out["hint_layer"] = c["HINT_LAYER"]
    elif method == "at":
        out["p"] = c["P"]
    elif method == "rkd":
        out |= {"distance_weight": c["DISTANCE_WEIGHT"], "angle_weight": c["ANGLE_WEIGHT"],
                "eps": c["PDIST"]["EPSILON"], "squared": c["PDIST"]["SQUARED"]}
    elif method == "pkt":  # not a config key in mdistiller: pkt_loss's default
        from test_method_pkt import ref_pkt_loss

        out["eps"] = inspect.signature(ref_pkt_loss).parameters["eps"].default
    elif method == "kdsvd":
        out["k"] = c["K"]
    elif method == "vid":
        out["init_pred_var"] = c["INIT_PRED_VAR"]
    return out


def _unsupported(method: str) -> dict[str, str]:
    return GEN._pair_overrides(method).get("unsupported") or {}


@pytest.mark.parametrize("method", ["fitnet", "at", "rkd", "pkt", "sp", "nst", "kdsvd", "vid"])
def test_feature_method_leaves_equal_mdistiller(method):
    ref = R.mdistiller(f"configs/cifar100/{method}.yaml")
    want = _expected(method)
    leaves = [CONFIGS / "cifar100" / pair / f"{method}.yaml" for pair in PAIRS
              if pair not in _unsupported(method)]
    assert len(leaves) == len(PAIRS) - len(_unsupported(method))
    for leaf in leaves:
        m = compose(leaf)["method"]
        assert m == want, leaf
        params = params_from_dict(m)
        assert params.warmup == 0.0  # mdistiller has no warm-up for these methods
        if method == "vid":  # eps acts only on trained variances; its value is the reference's
            assert params.eps == ref["VID"]["EPS"] and params.train_variance is False
    # The reference's own pair and solver
    d = ref["DISTILLER"]
    assert (d["TEACHER"], d["STUDENT"]) == ("resnet32x4", "resnet8x4")
    cfg = compose(CONFIGS / "cifar100" / "res32x4_res8x4" / f"{method}.yaml")
    assert (cfg["teacher"]["name"], cfg["model"]["name"]) == (d["TEACHER"], d["STUDENT"])
    sol = ref["SOLVER"]
    assert cfg["optim"]["lr"] == sol["LR"] and cfg["optim"]["momentum"] == sol["MOMENTUM"]
    assert cfg["optim"]["weight_decay"] == sol["WEIGHT_DECAY"]
    assert cfg["sched"]["milestones"] == sol["LR_DECAY_STAGES"]
    assert cfg["sched"]["gamma"] == sol["LR_DECAY_RATE"]
    assert cfg["train"]["epochs"] == sol["EPOCHS"]
    assert cfg["data"]["batch_size"] == sol["BATCH_SIZE"]


@pytest.mark.parametrize("method", ["fitnet", "vid"])
def test_shape_inference_input_size_is_the_references(method):
    """mdistiller sizes FitNet's / VID's modules with a dummy forward at INPUT_SIZE; ours use
    the dataset's input size (MethodContext.input_size)."""
    from topkd.data import dataset_info

    ref = R.mdistiller(f"configs/cifar100/{method}.yaml")
    info = dataset_info("cifar100")
    assert [info.image_size, info.image_size] == list(ref[method.upper()]["INPUT_SIZE"])
