"""ramp_exit: every backend against the reference, the op registration, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import apparate
from apparate.ops.ramp_exit import ramp_exit_ref
from apparate.testing import assert_confidence_close
from apparate.ops import BACKENDS
from tests.helpers import implementation, small_grid_under_interpreter

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
METRICS = ("maxprob", "margin", "entropy")


def _hidden(pool: str, batch: int, features: int, dtype, device, tokens: int = 5) -> torch.Tensor:
    shape = {"avg": (batch, features, 3, 2), "none": (batch, features)}.get(
        pool, (batch, tokens, features)
    )
    return torch.randn(shape, device=device).to(dtype)


def _head(classes: int, features: int, dtype, device, bias: bool = True):
    # Scaled so that softmax confidences spread over (0, 1) instead of saturating.
    weight = (torch.randn(classes, features, device=device) / math.sqrt(features) * 2).to(dtype)
    return weight, (torch.randn(classes, device=device).to(dtype) if bias else None)


def _threshold_between(confidence: torch.Tensor) -> torch.Tensor:
    """A threshold in the widest gap around the median confidence, so that float rounding in
    any backend cannot move a row across it; exit masks can then be compared exactly."""
    finite = confidence[torch.isfinite(confidence)].sort().values
    if finite.numel() < 2:
        return torch.tensor(0.5, device=confidence.device)
    gaps = finite[1:] - finite[:-1]
    middle = finite.numel() // 2
    lo, hi = max(0, middle - 3), min(gaps.numel(), middle + 3)
    at = lo + int(gaps[lo:hi].argmax())
    return ((finite[at] + finite[at + 1]) / 2).to(torch.float32).reshape(())


def check_against_reference(
    backend, device, hidden, weight, bias, *, pool, metric="maxprob", mask=None, alive=None,
    norm=None, norm_weight=None, norm_eps=1e-6,
):
    """Run ``backend`` and the reference on the same inputs; compare everything."""
    impl = implementation(backend, "ramp_exit", device)
    batch, classes = hidden.shape[0], weight.shape[0]
    probe = torch.tensor(0.5, device=device)
    conf_ref, _, _ = ramp_exit_ref(hidden, weight, bias, probe, pool, metric, mask, alive, norm,
                                   norm_weight, norm_eps, None)
    threshold = _threshold_between(conf_ref)
    logits_ref = torch.full((batch, classes), 7.0, device=device)
    logits = torch.full((batch, classes), 7.0, device=device)
    expected = ramp_exit_ref(hidden, weight, bias, threshold, pool, metric, mask, alive, norm,
                             norm_weight, norm_eps, logits_ref)
    actual = impl(hidden, weight, bias, threshold, pool, metric, mask, alive, norm, norm_weight,
                  norm_eps, logits)
    assert actual[0].dtype == torch.float32 and actual[0].shape == (batch,)
    assert actual[1].dtype == torch.int64 and actual[1].shape == (batch,)
    assert actual[2].dtype == torch.bool and actual[2].shape == (batch,)
    assert torch.equal(actual[1], expected[1]), "predictions differ"
    assert torch.equal(actual[2], expected[2]), "exit masks differ"
    assert_confidence_close(actual[0], expected[0], hidden.dtype)
    live = torch.isfinite(logits_ref).all(1)
    torch.testing.assert_close(logits[live], logits_ref[live], atol=1e-4, rtol=1e-4)
    return actual


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pool", ["cls", "mean", "last", "avg", "none"])
@pytest.mark.parametrize("metric", METRICS)
def test_pools_metrics_dtypes(backend, device, dtype, pool, metric):
    hidden = _hidden(pool, 17, 37, dtype, device)
    weight, bias = _head(10, 37, dtype, device)
    check_against_reference(backend, device, hidden, weight, bias, pool=pool, metric=metric)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "batch,features,classes",
    [(1, 100, 2), (3, 37, 3), (17, 384, 3), (64, 129, 1000), (3, 72, 49152)],
)
def test_awkward_shapes(backend, device, batch, features, classes):
    small_grid_under_interpreter(backend, classes)
    hidden = _hidden("cls", batch, features, torch.float32, device, tokens=3)
    weight, bias = _head(classes, features, torch.float32, device)
    check_against_reference(backend, device, hidden, weight, bias, pool="cls", metric="margin")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lm_head_with_rms_norm(backend, device, dtype):
    small_grid_under_interpreter(backend, 49152)
    hidden = _hidden("none", 1, 48, dtype, device)
    weight, _ = _head(49152, 48, dtype, device)
    norm_weight = (torch.rand(48, device=device) + 0.5).to(dtype)
    check_against_reference(backend, device, hidden, weight, None, pool="none", metric="entropy",
                            norm="rms", norm_weight=norm_weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("pool", ["cls", "mean", "avg"])
def test_norms(backend, device, norm, pool):
    hidden = _hidden(pool, 9, 40, torch.float32, device) * 3 + 1
    weight, bias = _head(7, 40, torch.float32, device)
    norm_weight = torch.rand(40, device=device) + 0.5
    check_against_reference(backend, device, hidden, weight, bias, pool=pool, norm=norm,
                            norm_weight=norm_weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool", ["mean", "last"])
def test_token_mask(backend, device, pool):
    hidden = _hidden(pool, 17, 24, torch.float32, device, tokens=9)
    mask = torch.rand(17, 9, device=device) > 0.4
    mask[3] = False  # no valid token: mean of nothing is 0, last valid is position 0
    mask[4] = True
    hidden[~mask] = float("nan")  # padding may hold anything; it must not leak into the pool
    weight, bias = _head(5, 24, torch.float32, device)
    check_against_reference(backend, device, hidden, weight, bias, pool=pool, mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_rows_never_exit(backend, device):
    hidden = _hidden("cls", 17, 24, torch.float32, device)
    alive = torch.rand(17, device=device) > 0.3
    hidden[~alive] = float("nan")  # dead rows may hold garbage
    weight, bias = _head(4, 24, torch.float32, device)
    conf, pred, exits = check_against_reference(backend, device, hidden, weight, bias, pool="cls",
                                                alive=alive)
    assert not exits[~alive].any()
    assert torch.isfinite(conf[~alive]).all()
    assert (conf[~alive] == 0).all() and (pred[~alive] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("classes", [3, 5000])
def test_nonfinite_rows_never_exit(backend, device, classes):
    small_grid_under_interpreter(backend, classes)
    hidden = _hidden("none", 6, 16, torch.float32, device)
    hidden[1, 3] = float("nan")
    hidden[2, 0] = float("inf")
    hidden[3, 5] = -float("inf")
    weight, bias = _head(classes, 16, torch.float32, device)
    impl = implementation(backend, "ramp_exit", device)
    zero = torch.tensor(0.0, device=device)  # everything finite would exit
    conf, pred, exits = impl(hidden, weight, bias, zero, "none", "maxprob", None, None, None,
                             None, 1e-6, None)
    assert exits.tolist() == [True, False, False, False, True, True]
    assert torch.isnan(conf[1:4]).all() and (pred[1:4] == -1).all()
    assert torch.isfinite(conf[[0, 4, 5]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    base = torch.randn(6, 40, 17, device=device)
    hidden = base.transpose(1, 2)[:, :, :30]  # (6, 17, 30), strides not contiguous
    assert not hidden.is_contiguous()
    weight, bias = _head(11, 30, torch.float32, device)
    check_against_reference(backend, device, hidden, weight, bias, pool="mean", metric="entropy")
    maps = torch.randn(5, 24, 3, 4, device=device).to(memory_format=torch.channels_last)
    weight, bias = _head(6, 24, torch.float32, device)
    check_against_reference(backend, device, maps, weight, bias, pool="avg")


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_updated_in_place_takes_effect(backend, device):
    impl = implementation(backend, "ramp_exit", device)
    hidden = _hidden("cls", 8, 16, torch.float32, device)
    weight, bias = _head(3, 16, torch.float32, device)
    threshold = torch.tensor(0.0, device=device)
    args = (hidden, weight, bias, threshold, "cls", "maxprob", None, None, None, None, 1e-6, None)
    assert impl(*args)[2].all()
    threshold.fill_(1.5)
    assert not impl(*args)[2].any()
    threshold.fill_(0.0)
    assert impl(*args)[2].all()


def test_confidences_lie_in_unit_interval(device):
    hidden = _hidden("none", 64, 32, torch.float32, device) * 10
    weight, bias = _head(50, 32, torch.float32, device)
    for metric in METRICS:
        head = apparate.RampHead(weight, bias, pool="none", metric=metric)
        result = apparate.ramp_exit(hidden, head, torch.tensor(0.5, device=device))
        assert ((result.confidence >= 0) & (result.confidence <= 1)).all(), metric


def test_known_values():
    """Hand-computed confidences for one two-class and one three-class row."""
    logits = torch.tensor([[0.0, math.log(3.0), -1e4]])  # p = (1/4, 3/4, 0)
    eye = torch.eye(3)
    threshold = torch.tensor(0.7)
    for metric, expected in [
        ("maxprob", 0.75),
        ("margin", 0.5),
        ("entropy", 1 - (-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))) / math.log(3)),
    ]:
        result = apparate.ramp_exit(logits, apparate.RampHead(eye, None, "none", metric),
                                    threshold)
        assert result.confidence.item() == pytest.approx(expected, abs=1e-6)
        assert result.prediction.item() == 1
        assert result.exit_mask.item() == (expected >= 0.7)


def test_public_function_matches_reference(device):
    hidden = _hidden("mean", 12, 20, torch.bfloat16, device, tokens=6)
    weight, bias = _head(4, 20, torch.float32, device)
    mask = torch.ones(12, 6, dtype=torch.int64, device=device)  # HF-style integer mask
    mask[:, 4:] = 0
    alive = torch.rand(12, device=device) > 0.2
    logits = torch.empty(12, 4, device=device)
    threshold = torch.tensor(0.6, device=device)
    head = apparate.RampHead(weight, bias, pool="mean", metric="margin")
    got = apparate.ramp_exit(hidden, head, threshold, mask=mask, alive=alive, logits_out=logits)
    want = ramp_exit_ref(hidden, weight, bias, threshold, "mean", "margin", mask.bool(), alive,
                         None, None, 1e-6, None)
    assert isinstance(got, apparate.RampExit)
    assert torch.equal(got.prediction, want[1]) and torch.equal(got.exit_mask, want[2])
    assert_confidence_close(got.confidence, want[0], torch.bfloat16)


def test_opcheck(device):
    hidden = _hidden("cls", 4, 16, torch.float32, device)
    weight, bias = _head(3, 16, torch.float32, device)
    threshold = torch.tensor(0.5, device=device)
    logits = torch.empty(4, 3, device=device)
    for args in [
        (hidden, weight, bias, threshold, "cls", "maxprob", None, None, None, None, 1e-6, None),
        (hidden, weight, None, threshold, "cls", "entropy", None, torch.ones(4, dtype=torch.bool,
         device=device), "rms", torch.ones(16, device=device), 1e-5, logits),
    ]:
        torch.library.opcheck(torch.ops.apparate.ramp_exit.default, args)
        if device == "cpu":
            torch.library.opcheck(implementation("cpp", "ramp_exit", device), args)


def test_torch_compile_fullgraph(device):
    hidden = _hidden("cls", 8, 16, torch.float32, device)
    weight, bias = _head(3, 16, torch.float32, device)
    threshold = torch.tensor(0.4, device=device)
    head = apparate.RampHead(weight, bias, pool="cls", metric="margin")

    def ramp(h):
        result = apparate.ramp_exit(h * 2, head, threshold)
        return result.confidence + 1, result.prediction, result.exit_mask

    compiled = torch.compile(ramp, fullgraph=True)
    got, want = compiled(hidden), ramp(hidden)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0])
    threshold.fill_(1.5)  # an in-place threshold change reaches the compiled graph too
    assert not compiled(hidden)[2].any()


class TestBadInput:
    def setup_method(self):
        self.hidden = torch.randn(4, 5, 16)
        self.weight = torch.randn(3, 16)
        self.threshold = torch.tensor(0.5)

    def call(self, **overrides):
        kwargs = dict(hidden=self.hidden, weight=self.weight, bias=None, threshold=self.threshold,
                      pool="cls")
        kwargs.update(overrides)
        per_call = {k: kwargs.pop(k) for k in ("mask", "alive", "logits_out") if k in kwargs}
        hidden, threshold = kwargs.pop("hidden"), kwargs.pop("threshold")
        return apparate.ramp_exit(hidden, apparate.RampHead(**kwargs), threshold, **per_call)

    @pytest.mark.parametrize(
        "overrides,error,words",
        [
            (dict(pool="max"), ValueError, ["pool", "'cls'", "'max'"]),
            (dict(metric="top1"), ValueError, ["metric", "'top1'"]),
            (dict(norm="batch"), ValueError, ["norm", "'batch'"]),
            (dict(hidden=torch.randn(4, 16)), ValueError, ["hidden", "3-D", "(4, 16)"]),
            (dict(hidden=torch.randn(4, 5, 16, dtype=torch.float64)), TypeError,
             ["hidden", "float64"]),
            (dict(hidden=[[1.0]]), TypeError, ["hidden", "list"]),
            (dict(weight=torch.randn(3, 15)), ValueError, ["weight", "H = 16", "(3, 15)"]),
            (dict(weight=torch.randn(1, 16)), ValueError, ["weight", "K = 2"]),
            (dict(bias=torch.randn(4)), ValueError, ["bias", "(3,)", "(4,)"]),
            (dict(threshold=torch.tensor([0.5])), ValueError, ["threshold", "0-dim", "(1,)"]),
            (dict(threshold=torch.tensor(0.5, dtype=torch.float64)), TypeError,
             ["threshold", "float32"]),
            (dict(threshold=0.5), TypeError, ["threshold", "float"]),
            (dict(mask=torch.ones(4, 5)), ValueError, ["mask", "pool='mean' or 'last'"]),
            (dict(pool="mean", mask=torch.ones(4, 6, dtype=torch.bool)), ValueError,
             ["mask", "(4, 5)", "(4, 6)"]),
            (dict(pool="mean", mask=torch.ones(4, 5)), TypeError, ["mask", "integer"]),
            (dict(alive=torch.ones(4)), TypeError, ["alive", "bool"]),
            (dict(alive=torch.ones(5, dtype=torch.bool)), ValueError, ["alive", "(4,)", "(5,)"]),
            (dict(norm="rms"), ValueError, ["norm_weight", "(16,)"]),
            (dict(norm_weight=torch.ones(16)), ValueError, ["norm_weight", "norm is None"]),
            (dict(norm="rms", norm_weight=torch.ones(16), norm_eps=0.0), ValueError,
             ["norm_eps", "positive"]),
            (dict(logits_out=torch.empty(4, 3, dtype=torch.float16)), TypeError,
             ["logits_out", "float32"]),
            (dict(logits_out=torch.empty(4, 4)), ValueError, ["logits_out", "(4, 3)"]),
            (dict(logits_out=torch.empty(3, 4).t()), ValueError, ["logits_out", "contiguous"]),
            (dict(weight=torch.randn(3, 16, device="meta")), ValueError,
             ["weight", "device", "meta"]),
        ],
    )
    def test_errors_name_argument_expected_and_received(self, overrides, error, words):
        with pytest.raises(error) as info:
            self.call(**overrides)
        for word in words:
            assert word in str(info.value), (word, str(info.value))
