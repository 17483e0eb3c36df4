"""ramp_exit, property-based: generated shapes, dtypes, layouts, non-finite inputs, dead rows and
thresholds on every backend that runs here, plus generated invalid arguments.

Exit masks and predictions are compared exactly, except where float rounding may legitimately
decide them: a row whose reference confidence lies within the confidence tolerance of the
threshold, or whose two best reference logits lie within rounding of each other. Integer-valued
inputs make every logit exact, and there predictions are compared on every row, ties included.
Every backend's own exit mask must equal ``alive & isfinite(confidence) & (confidence >=
threshold)`` exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from hypothesis import assume, event, given
from hypothesis import strategies as st

import apparate
from apparate.ops import BACKENDS
from apparate.ops.ramp_exit import FLOAT_DTYPES, METRICS, NORMS, POOLS, ramp_exit_ref
from apparate.testing import assert_confidence_close, tolerance
from tests.helpers import implementation
from tests.ops.fuzzing import assert_refused, fuzz

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The Triton interpreter costs tens of milliseconds a call: fewer, smaller cases there.
INTERPRETED = DEVICE == "cpu"
_TOKEN_POOLS = ("cls", "mean", "last")


@dataclass(frozen=True)
class Case:
    """One call of the op's schema, plus what the properties need to know about it."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    threshold: torch.Tensor
    pool: str
    metric: str
    mask: torch.Tensor | None
    alive: torch.Tensor | None
    norm: str | None
    norm_weight: torch.Tensor | None
    norm_eps: float
    exact: bool  # every logit is exactly representable and computed without rounding
    threshold_kind: str
    pick: int  # which finite row "equal" thresholds copy the confidence of

    def _repr_pretty_(self, printer, cycle) -> None:  # how Hypothesis prints a failing case
        printer.text(repr(self))

    def __repr__(self) -> str:  # shapes, not values: a failing case must stay readable
        def describe(t):
            if t is None:
                return "None"
            return f"{str(t.dtype).removeprefix('torch.')}{tuple(t.shape)} strides {t.stride()}"
        return (f"Case(hidden={describe(self.hidden)}, weight={describe(self.weight)}, "
                f"bias={describe(self.bias)}, threshold={float(self.threshold)!r} "
                f"({self.threshold_kind}), pool={self.pool!r}, metric={self.metric!r}, "
                f"mask={describe(self.mask)}, alive={describe(self.alive)}, norm={self.norm!r}, "
                f"norm_eps={self.norm_eps}, exact={self.exact}, hidden_nonfinite="
                f"{(~torch.isfinite(self.hidden.float())).sum().item()})")

    @property
    def batch(self) -> int:
        return self.hidden.shape[0]

    @property
    def classes(self) -> int:
        return self.weight.shape[0]

    def args(self, threshold: torch.Tensor, logits_out: torch.Tensor | None) -> tuple:
        return (self.hidden, self.weight, self.bias, threshold, self.pool, self.metric, self.mask,
                self.alive, self.norm, self.norm_weight, self.norm_eps, logits_out)


_SPECIALS = (float("nan"), float("inf"), -float("inf"))
_THRESHOLDS = {"zero": 0.0, "one": 1.0, "negative": -0.25, "above_one": 1.5, "inf": math.inf,
               "minus_inf": -math.inf, "nan": math.nan}


def _layout(values: torch.Tensor, layout: str, generator: torch.Generator) -> torch.Tensor:
    """``values`` (contiguous) in another memory layout holding the same elements."""
    if layout == "strided" and values.dim() >= 2:
        # A window of a larger buffer: non-unit row strides and a storage offset.
        pad = [int(torch.randint(1, 4, (), generator=generator)) for _ in range(values.dim())]
        big = torch.zeros([s + p for s, p in zip(values.shape, pad)], dtype=values.dtype,
                          device=values.device)
        window = big[tuple(slice(1, 1 + s) for s in values.shape)]
        window.copy_(values)
        return window
    if layout == "transposed" and values.dim() >= 2:
        # Last dimension not contiguous (channels_last for feature maps).
        if values.dim() == 4:
            return values.to(memory_format=torch.channels_last)
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "expanded" and values.shape[0] > 0:
        return values[:1].expand_as(values)  # every row is the same memory (batch stride 0)
    return values


@st.composite
def ramp_cases(draw, pools: tuple[str, ...] = POOLS, max_batch: int = 9, max_features: int = 48,
               max_classes: int = 40, large_heads: bool = False) -> Case:
    pool = draw(st.sampled_from(pools))
    metric = draw(st.sampled_from(METRICS))
    norm = draw(st.sampled_from(NORMS))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    head_dtype = draw(st.sampled_from(FLOAT_DTYPES))
    batch = draw(st.integers(0, max_batch))
    features = draw(st.integers(1, max_features))
    classes = draw(st.integers(2, max_classes))
    if large_heads and draw(st.booleans()):
        # Above the C++ kernel's small-head limit (K * H > 2^15): the BLAS path.
        features = draw(st.integers(64, 160))
        classes = draw(st.integers(max(2, 2**15 // features + 1), 600))
    integer = draw(st.booleans())
    tokens = draw(st.integers(1, 12))
    spatial = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))

    if pool in _TOKEN_POOLS:
        shape = (batch, tokens, features)
    elif pool == "avg":
        shape = (batch, features, *spatial)
    else:
        shape = (batch, features)
    if integer:
        values = torch.randint(-2, 3, shape, generator=generator).float()
    else:
        scale = draw(st.sampled_from([1e-3, 1.0, 4.0]))
        values = torch.randn(shape, generator=generator) * scale
    row_size = math.prod(shape[1:])
    if batch > 0:
        for _ in range(draw(st.integers(0, 3))):
            row = draw(st.integers(0, batch - 1))
            special = draw(st.sampled_from(_SPECIALS))
            if draw(st.booleans()):
                values[row] = special
            else:
                values[row].view(-1)[draw(st.integers(0, row_size - 1))] = special

    mask = None
    if pool in ("mean", "last") and draw(st.booleans()):
        mask = torch.rand(batch, tokens, generator=generator) < draw(st.sampled_from([0.3, 0.8]))
        if batch > 0:
            mask[draw(st.integers(0, batch - 1))] = draw(st.booleans())  # a row of none or all
    alive = None
    if draw(st.booleans()):
        alive = torch.rand(batch, generator=generator) < draw(st.sampled_from([0.0, 0.5, 1.0]))
        if draw(st.booleans()):
            alive = torch.stack([alive, ~alive], 1)[:, 0]  # a strided view

    if integer:
        weight = torch.randint(-2, 3, (classes, features), generator=generator).float()
        if classes >= 3:
            weight[2] = weight[0]  # tied classes: the first index of the maximum must win
        bias = torch.randint(-2, 3, (classes,), generator=generator).float()
    else:
        weight = torch.randn(classes, features, generator=generator) * (2 / math.sqrt(features))
        bias = torch.randn(classes, generator=generator)
    bias = bias if draw(st.booleans()) else None
    if bias is not None and draw(st.integers(0, 9)) == 0:
        bias[draw(st.integers(0, classes - 1))] = draw(st.sampled_from(_SPECIALS))
    norm_weight = (torch.rand(features, generator=generator) + 0.5) if norm is not None else None

    # Pooling divides by the number of positions; only a power of two keeps integers exact.
    positions = {"mean": tokens, "avg": spatial[0] * spatial[1]}.get(pool, 1)
    exact = (integer and norm is None and positions & (positions - 1) == 0
             and not (pool == "mean" and mask is not None))

    layout = draw(st.sampled_from(["contiguous", "strided", "transposed", "expanded"]))
    hidden = _layout(values.to(dtype).to(DEVICE), layout, generator)
    kind = draw(st.sampled_from([*_THRESHOLDS, "uniform", "equal", "equal"]))
    if kind == "uniform":
        threshold = float(torch.rand((), generator=generator))
    else:
        threshold = _THRESHOLDS.get(kind, 0.5)  # "equal" is resolved against the reference
    move = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    param = lambda t: None if t is None else t.to(head_dtype).to(DEVICE)  # noqa: E731
    return Case(
        hidden=hidden, weight=param(weight), bias=param(bias),
        threshold=torch.tensor(threshold, dtype=torch.float32, device=DEVICE),
        pool=pool, metric=metric, mask=move(mask), alive=move(alive), norm=norm,
        norm_weight=param(norm_weight),
        norm_eps=draw(st.sampled_from([1e-6, 1e-5, 0.1])), exact=exact, threshold_kind=kind,
        pick=draw(st.integers(0, 2**16)),
    )


def run(impl, case: Case, threshold: torch.Tensor):
    logits = torch.full((case.batch, case.classes), 7.0, device=DEVICE)
    confidence, prediction, exit_mask = impl(*case.args(threshold, logits))
    return confidence, prediction, exit_mask, logits


def resolve_threshold(case: Case, confidence: torch.Tensor) -> torch.Tensor:
    """The case's threshold; "equal" copies the confidence of one finite live row (else 0.5)."""
    if case.threshold_kind != "equal":
        return case.threshold
    live = torch.isfinite(confidence)
    if case.alive is not None:
        live &= case.alive
    rows = live.nonzero().flatten().tolist()
    if not rows:
        return case.threshold
    return confidence[rows[case.pick % len(rows)]].clone().reshape(())


def assert_well_formed(case: Case, threshold: torch.Tensor, confidence, prediction, exit_mask):
    """What every backend promises about its own outputs, whatever the inputs held."""
    batch = case.batch
    assert confidence.shape == (batch,) and confidence.dtype == torch.float32
    assert prediction.shape == (batch,) and prediction.dtype == torch.int64
    assert exit_mask.shape == (batch,) and exit_mask.dtype == torch.bool
    expected = torch.isfinite(confidence) & (confidence >= threshold)
    if case.alive is not None:
        expected &= case.alive
        dead = ~case.alive
        assert (confidence[dead] == 0).all() and (prediction[dead] == 0).all()
    assert torch.equal(exit_mask, expected), "exit_mask != alive & isfinite(c) & (c >= threshold)"
    live = case.alive if case.alive is not None else torch.ones_like(exit_mask)
    bad = torch.isnan(confidence)
    assert torch.equal(bad & live, (prediction == -1) & live), "NaN confidence <=> prediction -1"
    ok = live & ~bad
    assert ((confidence[ok] >= 0) & (confidence[ok] <= 1)).all()
    assert ((prediction[ok] >= 0) & (prediction[ok] < case.classes)).all()


def assert_matches_reference(case: Case, threshold, got, want, *, compare_logits: bool = True):
    """``got`` (a backend's outputs and logits) against ``want`` (the reference's)."""
    confidence, prediction, exit_mask, logits = got
    conf_ref, pred_ref, exit_ref, logits_ref = want
    assert_confidence_close(confidence, conf_ref, case.hidden.dtype)
    if compare_logits:
        if case.exact:
            torch.testing.assert_close(logits, logits_ref, rtol=0, atol=0, equal_nan=True)
        else:
            torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4, equal_nan=True)
    finite = pred_ref >= 0
    if case.alive is not None:
        finite &= case.alive  # dead rows predict 0 by contract, whatever their logits
    if case.exact:
        assert torch.equal(prediction, pred_ref), "predictions differ on exact logits"
    else:
        # Rounding may reorder two logits that agree to within it: any of those is right.
        ordered = logits_ref.topk(2, dim=1).values if case.batch else logits_ref[:, :2]
        near_tie = finite & (ordered[:, 0] - ordered[:, 1] <= 1e-4 * (1 + ordered[:, 0].abs()))
        assert torch.equal(prediction[~near_tie], pred_ref[~near_tie]), "predictions differ"
        rows = near_tie.nonzero().flatten()
        chosen = logits_ref[rows, prediction[rows]]
        assert (chosen >= ordered[rows, 0] - 1e-4 * (1 + ordered[rows, 0].abs())).all()
    atol, rtol = tolerance(case.hidden.dtype)
    gap = (conf_ref - threshold).abs()
    near = torch.isfinite(conf_ref) & (gap <= atol + rtol * threshold.abs())
    assert torch.equal(exit_mask[~near], exit_ref[~near]), "exit masks differ"


def reference_outputs(case: Case, threshold: torch.Tensor):
    return run(ramp_exit_ref, case, threshold)


def record(case: Case) -> None:
    """What the case covers, for ``--hypothesis-show-statistics``."""
    event(f"pool={case.pool}")
    event(f"metric={case.metric} norm={case.norm}")
    event(f"hidden dtype={str(case.hidden.dtype).removeprefix('torch.')}")
    event(f"batch={min(case.batch, 2) if case.batch < 2 else '2+'}")
    event(f"threshold={case.threshold_kind}")
    event(f"non-finite hidden={not bool(torch.isfinite(case.hidden.float()).all())}")
    event(f"dead rows={case.alive is not None and not bool(case.alive.all())}")
    event(f"exact logits={case.exact}")
    event(f"large head={case.classes * case.weight.shape[1] > 2**15}")


def check_backend(impl, case: Case) -> None:
    record(case)
    threshold = resolve_threshold(case, reference_outputs(case, case.threshold)[0]).clone()
    want = reference_outputs(case, threshold)
    assert_well_formed(case, threshold, *want[:3])
    got = run(impl, case, threshold)
    assert_well_formed(case, threshold, *got[:3])
    assert_matches_reference(case, threshold, got, want)
    if case.threshold_kind == "equal":
        # A threshold equal to a row's own confidence lets that row exit; the threshold tensor
        # overwritten in place takes effect on the next call and changes nothing else.
        own = resolve_threshold(case, got[0])
        threshold.copy_(own)
        again = run(impl, case, threshold)
        assert_well_formed(case, threshold, *again[:3])
        torch.testing.assert_close(again[0], got[0], rtol=0, atol=0, equal_nan=True)
        assert torch.equal(again[1], got[1])
        hit = torch.isfinite(again[0]) & (again[0] == own)
        if case.alive is not None:
            hit &= case.alive
        assert again[2][hit].all()


# Parametrised by pool so that each pool gets its share of cases on every backend.
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in ("reference", "triton")])
@fuzz(60)
@given(data=st.data())
def test_compiled_backend_matches_reference(backend, pool, data):
    impl = implementation(backend, "ramp_exit", DEVICE)
    check_backend(impl, data.draw(ramp_cases((pool,), large_heads=True), label="case"))


# numpy, which runs the interpreted kernels, warns about the NaN and infinities fed in on purpose.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("pool", POOLS)
@fuzz(20 if INTERPRETED else 60)
@given(data=st.data())
def test_triton_matches_reference(pool, data):
    impl = implementation("triton", "ramp_exit", DEVICE)
    strategy = (ramp_cases((pool,), max_features=24, max_classes=24) if INTERPRETED
                else ramp_cases((pool,), large_heads=True))
    check_backend(impl, data.draw(strategy, label="case"))


def float64_oracle(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(confidence, prediction, logits) in float64, written from the op's documented semantics
    independently of ``ramp_exit_ref``; dead rows are left to the caller."""
    h = case.hidden.double()
    if case.pool == "cls":
        pooled = h[:, 0]
    elif case.pool == "mean" and case.mask is None:
        pooled = h.mean(1)
    elif case.pool == "mean":
        valid = case.mask[:, :, None]
        pooled = torch.where(valid, h, 0.0).sum(1) / case.mask.sum(1).clamp(min=1)[:, None]
    elif case.pool == "last":
        rows = []
        for b in range(case.batch):
            valid = [t for t in range(h.shape[1]) if case.mask is None or case.mask[b, t]]
            rows.append(h[b, valid[-1] if valid else 0])  # no valid token: position 0
        pooled = torch.stack(rows) if rows else h[:, 0]
    elif case.pool == "avg":
        pooled = h.mean((2, 3))
    else:
        pooled = h
    if case.alive is not None:
        pooled = torch.where(case.alive[:, None], pooled, 0.0)
    if case.norm is not None:
        if case.norm == "layer":
            pooled = pooled - pooled.mean(1, keepdim=True)
        scale = (pooled.square().mean(1, keepdim=True) + case.norm_eps).rsqrt()
        pooled = pooled * scale * case.norm_weight.double()
    logits = pooled @ case.weight.double().t()
    if case.bias is not None:
        logits = logits + case.bias.double()
    probs = logits.softmax(1)
    top2 = probs.topk(2, dim=1).values if case.batch else probs[:, :2]
    if case.metric == "maxprob":
        confidence = top2[:, 0]
    elif case.metric == "margin":
        confidence = top2[:, 0] - top2[:, 1]
    else:
        entropy = -torch.special.xlogy(probs, probs).sum(1)
        confidence = (1 - entropy / math.log(case.classes)).clamp(0, 1)
    finite = torch.isfinite(logits).all(1)
    confidence = torch.where(finite, confidence, math.nan)
    prediction = torch.where(finite, logits.argmax(1), -1)
    return confidence, prediction, logits


@pytest.mark.parametrize("pool", POOLS)
@fuzz(40)
@given(data=st.data())
def test_reference_matches_float64_oracle(pool, data):
    """The reference against a float64 restatement of the semantics (no shared code)."""
    case = data.draw(ramp_cases((pool,), large_heads=True), label="case")
    record(case)
    threshold = resolve_threshold(case, reference_outputs(case, case.threshold)[0])
    confidence, prediction, exit_mask, logits = reference_outputs(case, threshold)
    assert_well_formed(case, threshold, confidence, prediction, exit_mask)
    conf64, pred64, logits64 = float64_oracle(case)
    torch.testing.assert_close(logits.double(), logits64, rtol=1e-4, atol=1e-4, equal_nan=True)
    live = torch.ones_like(exit_mask) if case.alive is None else case.alive
    torch.testing.assert_close(confidence[live].double(), conf64[live], rtol=1e-4, atol=2e-5,
                               equal_nan=True)
    top2 = logits64.topk(2, dim=1).values if case.batch else logits64[:, :2]
    clear = live & (top2[:, 0] - top2[:, 1] > 1e-4 * (1 + top2[:, 0].abs()))
    clear |= live & (pred64 == -1)
    if case.exact:
        clear = live
    assert torch.equal(prediction[clear], pred64[clear])


@fuzz(150)
@given(case=ramp_cases(large_heads=True), data=st.data())
def test_public_function_accepts_valid_input(case, data):
    """``apparate.ramp_exit`` with a ``RampHead``: every generated valid call passes the checks
    (integer masks, Parameters, thresholds that are views, optional logits_out) and agrees with
    the reference."""
    eps_type = data.draw(st.sampled_from([float, np.float64]), label="norm_eps type")
    head = apparate.RampHead(case.weight, case.bias, case.pool, case.metric, case.norm,
                             case.norm_weight, eps_type(case.norm_eps))
    threshold = resolve_threshold(case, reference_outputs(case, case.threshold)[0])
    want = reference_outputs(case, threshold)
    hidden, mask = case.hidden, case.mask
    if data.draw(st.booleans(), label="hidden as nn.Parameter"):
        hidden = torch.nn.Parameter(hidden, requires_grad=False)
    if mask is not None:
        mask = mask.to(data.draw(st.sampled_from([torch.bool, torch.int64, torch.uint8]),
                                 label="mask dtype"))
    public_threshold = threshold
    if data.draw(st.booleans(), label="threshold is a view"):
        public_threshold = torch.stack([torch.zeros_like(threshold), threshold])[1]
    logits = None
    if data.draw(st.booleans(), label="logits_out"):
        logits = torch.full((case.batch, case.classes), 7.0, device=DEVICE)
    result = apparate.ramp_exit(hidden, head, public_threshold, mask=mask, alive=case.alive,
                                logits_out=logits)
    assert isinstance(result, apparate.RampExit)
    assert_well_formed(case, threshold, *result)
    assert_matches_reference(case, threshold, (*result, want[3] if logits is None else logits),
                             want, compare_logits=logits is not None)


# -- invalid arguments ------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    """A valid public call, taken apart so that one argument at a time can be spoiled."""

    hidden: object
    head: dict  # RampHead keyword arguments
    threshold: object
    per_call: dict  # mask, alive, logits_out

    def __call__(self):
        head = apparate.RampHead(**self.head) if isinstance(self.head, dict) else self.head
        return apparate.ramp_exit(self.hidden, head, self.threshold, **self.per_call)

    @property
    def batch(self) -> int:
        return self.hidden.shape[0]

    @property
    def pool(self) -> str:
        return self.head["pool"]


@st.composite
def valid_calls(draw) -> Call:
    pool = draw(st.sampled_from(POOLS))
    batch, tokens = draw(st.integers(0, 5)), draw(st.integers(1, 4))
    features, classes = draw(st.integers(1, 8)), draw(st.integers(2, 5))
    shape = {"avg": (batch, features, 2, 3), "none": (batch, features)}.get(
        pool, (batch, tokens, features))
    per_call = {}
    if pool in ("mean", "last") and draw(st.booleans()):
        per_call["mask"] = torch.ones(batch, tokens, dtype=torch.bool)
    if draw(st.booleans()):
        per_call["alive"] = torch.ones(batch, dtype=torch.bool)
    if draw(st.booleans()):
        per_call["logits_out"] = torch.empty(batch, classes)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    randn = lambda *size: torch.randn(size, generator=generator)  # noqa: E731
    head = dict(weight=randn(classes, features), bias=randn(classes), pool=pool,
                metric=draw(st.sampled_from(METRICS)))
    if draw(st.booleans()):
        head.update(norm=draw(st.sampled_from(NORMS[1:])), norm_weight=torch.ones(features))
    return Call(randn(*shape), head, torch.tensor(0.5), per_call)


def _tokens(call: Call) -> int:
    assume(call.pool in _TOKEN_POOLS)
    return call.hidden.shape[1]


def _features(call: Call) -> int:
    return call.head["weight"].shape[1]


def _classes(call: Call) -> int:
    return call.head["weight"].shape[0]


def _with_head(call: Call, **changes) -> Call:
    return replace(call, head={**call.head, **changes})


def _with(call: Call, **changes) -> Call:
    return replace(call, per_call={**call.per_call, **changes})


def _mask_pool(call: Call) -> Call:
    assume(call.pool in ("mean", "last"))
    return call


B = lambda c: c.batch  # noqa: E731
K = _classes
H = _features
T = _tokens

# name -> (spoil a valid call, error type, words the message must hold given the spoiled call)
RAMP_EXIT_INVALID = {
    # hidden
    "hidden_not_a_tensor": (
        lambda c: replace(c, hidden=c.hidden.tolist()), TypeError, lambda c: ["hidden", "list"]),
    "hidden_numpy": (
        lambda c: replace(c, hidden=c.hidden.numpy()), TypeError, lambda c: ["hidden", "ndarray"]),
    "hidden_extra_dim": (
        lambda c: replace(c, hidden=c.hidden[..., None]), ValueError,
        lambda c: ["hidden", f"{c.hidden.dim() - 1}-D", f"{c.hidden.dim()}-D",
                   str(tuple(c.hidden.shape))]),
    "hidden_missing_dim": (
        lambda c: replace(c, hidden=c.hidden[..., 0]), ValueError,
        lambda c: ["hidden", f"{c.hidden.dim() + 1}-D", f"{c.hidden.dim()}-D"]),
    "hidden_float64": (
        lambda c: replace(c, hidden=c.hidden.double()), TypeError,
        lambda c: ["hidden", "float32", "float64"]),
    "hidden_int": (
        lambda c: replace(c, hidden=c.hidden.int()), TypeError,
        lambda c: ["hidden", "float32", "int32"]),
    "hidden_features": (
        lambda c: replace(c, hidden=torch.cat([c.hidden, c.hidden[:, -1:]], 1)
                          if c.pool in ("avg", "none")
                          else torch.cat([c.hidden, c.hidden[..., -1:]], -1)),
        ValueError, lambda c: ["weight", f"H = {H(c) + 1}", str(tuple(c.head["weight"].shape))]),
    "hidden_no_tokens": (
        lambda c: replace(c, hidden=c.hidden[:, :0] if T(c) else None), ValueError,
        lambda c: ["hidden", "T >= 1", str(tuple(c.hidden.shape))]),
    "hidden_wrong_device": (
        lambda c: replace(c, hidden=c.hidden.to("meta")), ValueError,
        lambda c: ["device", "meta", "cpu"]),
    "head_not_a_ramphead": (
        lambda c: replace(c, head=(c.head["weight"], c.head["bias"])), TypeError,
        lambda c: ["head", "RampHead", "tuple"]),
    # threshold
    "threshold_python_float": (
        lambda c: replace(c, threshold=0.5), TypeError, lambda c: ["threshold", "float"]),
    "threshold_1d": (
        lambda c: replace(c, threshold=torch.tensor([0.5])), ValueError,
        lambda c: ["threshold", "0-dim", "(1,)"]),
    "threshold_per_row": (
        lambda c: replace(c, threshold=torch.full((B(c),), 0.5)), ValueError,
        lambda c: ["threshold", "0-dim", f"({B(c)},)"]),
    "threshold_float64": (
        lambda c: replace(c, threshold=torch.tensor(0.5, dtype=torch.float64)), TypeError,
        lambda c: ["threshold", "float32", "float64"]),
    "threshold_float16": (
        lambda c: replace(c, threshold=torch.tensor(0.5, dtype=torch.float16)), TypeError,
        lambda c: ["threshold", "float32", "float16"]),
    "threshold_int": (
        lambda c: replace(c, threshold=torch.tensor(1)), TypeError,
        lambda c: ["threshold", "float32", "int64"]),
    "threshold_wrong_device": (
        lambda c: replace(c, threshold=torch.tensor(0.5, device="meta")), ValueError,
        lambda c: ["threshold", "meta", "cpu"]),
    # alive
    "alive_batch": (
        lambda c: _with(c, alive=torch.ones(B(c) + 1, dtype=torch.bool)), ValueError,
        lambda c: ["alive", f"({B(c)},)", f"({B(c) + 1},)"]),
    "alive_2d": (
        lambda c: _with(c, alive=torch.ones(B(c), 1, dtype=torch.bool)), ValueError,
        lambda c: ["alive", f"({B(c)},)", f"({B(c)}, 1)"]),
    "alive_float": (
        lambda c: _with(c, alive=torch.ones(B(c))), TypeError,
        lambda c: ["alive", "bool", "float32"]),
    "alive_uint8": (
        lambda c: _with(c, alive=torch.ones(B(c), dtype=torch.uint8)), TypeError,
        lambda c: ["alive", "bool", "uint8"]),
    "alive_list": (
        lambda c: _with(c, alive=[True] * B(c)), TypeError, lambda c: ["alive", "list"]),
    "alive_wrong_device": (
        lambda c: _with(c, alive=torch.ones(B(c), dtype=torch.bool, device="meta")), ValueError,
        lambda c: ["alive", "meta", "cpu"]),
    # mask
    "mask_unused_by_pool": (
        lambda c: _with(c, mask=torch.ones(B(c), 1, dtype=torch.bool))
        if c.pool not in ("mean", "last") else assume(False),
        ValueError, lambda c: ["mask", "pool='mean' or 'last'", repr(c.pool)]),
    "mask_batch": (
        lambda c: _with(_mask_pool(c), mask=torch.ones(B(c) + 1, T(c), dtype=torch.bool)),
        ValueError, lambda c: ["mask", f"({B(c)}, {T(c)})", f"({B(c) + 1}, {T(c)})"]),
    "mask_tokens": (
        lambda c: _with(_mask_pool(c), mask=torch.ones(B(c), T(c) + 1, dtype=torch.bool)),
        ValueError, lambda c: ["mask", f"({B(c)}, {T(c)})", f"({B(c)}, {T(c) + 1})"]),
    "mask_float": (
        lambda c: _with(_mask_pool(c), mask=torch.ones(B(c), T(c))), TypeError,
        lambda c: ["mask", "integer", "float32"]),
    "mask_list": (
        lambda c: _with(_mask_pool(c), mask=[[True] * T(c)] * B(c)), TypeError,
        lambda c: ["mask", "list"]),
    "mask_wrong_device": (
        lambda c: _with(_mask_pool(c), mask=torch.ones(B(c), T(c), device="meta")), ValueError,
        lambda c: ["mask", "meta", "cpu"]),
    # logits_out
    "logits_out_float16": (
        lambda c: _with(c, logits_out=torch.empty(B(c), K(c), dtype=torch.float16)), TypeError,
        lambda c: ["logits_out", "float32", "float16"]),
    "logits_out_classes": (
        lambda c: _with(c, logits_out=torch.empty(B(c), K(c) + 1)), ValueError,
        lambda c: ["logits_out", f"({B(c)}, {K(c)})", f"({B(c)}, {K(c) + 1})"]),
    "logits_out_batch": (
        lambda c: _with(c, logits_out=torch.empty(B(c) + 1, K(c))), ValueError,
        lambda c: ["logits_out", f"({B(c)}, {K(c)})", f"({B(c) + 1}, {K(c)})"]),
    "logits_out_not_contiguous": (
        lambda c: _with(c, logits_out=torch.empty(K(c), B(c)).t()) if B(c) >= 2 else assume(False),
        ValueError, lambda c: ["logits_out", "contiguous", str(c.per_call["logits_out"].stride())]),
    "logits_out_wrong_device": (
        lambda c: _with(c, logits_out=torch.empty(B(c), K(c), device="meta")), ValueError,
        lambda c: ["logits_out", "meta", "cpu"]),
    # the head
    "pool_unknown": (
        lambda c: _with_head(c, pool="max"), ValueError, lambda c: ["pool", "'cls'", "'max'"]),
    "pool_none": (
        lambda c: _with_head(c, pool=None), ValueError, lambda c: ["pool", "'cls'", "None"]),
    "metric_unknown": (
        lambda c: _with_head(c, metric="top1"), ValueError,
        lambda c: ["metric", "'maxprob'", "'top1'"]),
    "norm_unknown": (
        lambda c: _with_head(c, norm="batch", norm_weight=torch.ones(H(c))), ValueError,
        lambda c: ["norm", "'rms'", "'batch'"]),
    "weight_1d": (
        lambda c: _with_head(c, weight=c.head["weight"][0]), ValueError,
        lambda c: ["weight", "2-D", "1-D"]),
    "weight_3d": (
        lambda c: _with_head(c, weight=c.head["weight"][None]), ValueError,
        lambda c: ["weight", "2-D", "3-D"]),
    "weight_one_class": (
        lambda c: _with_head(c, weight=c.head["weight"][:1], bias=None), ValueError,
        lambda c: ["weight", "K = 2", f"(1, {H(c)})"]),
    "weight_float64": (
        lambda c: _with_head(c, weight=c.head["weight"].double()), TypeError,
        lambda c: ["weight", "float32", "float64"]),
    "weight_int": (
        lambda c: _with_head(c, weight=c.head["weight"].long()), TypeError,
        lambda c: ["weight", "float32", "int64"]),
    "weight_list": (
        lambda c: _with_head(c, weight=c.head["weight"].tolist()), TypeError,
        lambda c: ["weight", "list"]),
    "bias_classes": (
        lambda c: _with_head(c, bias=torch.zeros(K(c) + 1)), ValueError,
        lambda c: ["bias", f"({K(c)},)", f"({K(c) + 1},)"]),
    "bias_2d": (
        lambda c: _with_head(c, bias=c.head["bias"][None]), ValueError,
        lambda c: ["bias", f"({K(c)},)", f"(1, {K(c)})"]),
    "bias_float64": (
        lambda c: _with_head(c, bias=c.head["bias"].double()), TypeError,
        lambda c: ["bias", "float32", "float64"]),
    "bias_wrong_device": (
        lambda c: _with_head(c, bias=c.head["bias"].to("meta")), ValueError,
        lambda c: ["bias", "meta", "cpu"]),
    "norm_without_norm_weight": (
        lambda c: _with_head(c, norm="rms", norm_weight=None), ValueError,
        lambda c: ["norm_weight", f"({H(c)},)"]),
    "norm_weight_features": (
        lambda c: _with_head(c, norm="layer", norm_weight=torch.ones(H(c) + 1)), ValueError,
        lambda c: ["norm_weight", f"({H(c)},)", f"({H(c) + 1},)"]),
    "norm_weight_float64": (
        lambda c: _with_head(c, norm="rms", norm_weight=torch.ones(H(c), dtype=torch.float64)),
        TypeError, lambda c: ["norm_weight", "float32", "float64"]),
    "norm_weight_without_norm": (
        lambda c: _with_head(c, norm=None, norm_weight=torch.ones(H(c))), ValueError,
        lambda c: ["norm_weight", "norm is None"]),
    "norm_weight_wrong_device": (
        lambda c: _with_head(c, norm="rms", norm_weight=torch.ones(H(c), device="meta")),
        ValueError, lambda c: ["norm_weight", "meta", "cpu"]),
    "norm_eps_zero": (
        lambda c: _with_head(c, norm_eps=0.0), ValueError,
        lambda c: ["norm_eps", "positive", "0.0"]),
    "norm_eps_negative": (
        lambda c: _with_head(c, norm_eps=-1e-5), ValueError,
        lambda c: ["norm_eps", "positive", "-1e-05"]),
    "norm_eps_nan": (
        lambda c: _with_head(c, norm_eps=math.nan), ValueError, lambda c: ["norm_eps", "nan"]),
    "norm_eps_str": (
        lambda c: _with_head(c, norm_eps="1e-5"), TypeError, lambda c: ["norm_eps", "str"]),
    "norm_eps_bool": (
        lambda c: _with_head(c, norm_eps=True), TypeError, lambda c: ["norm_eps", "bool"]),
    "norm_eps_tensor": (
        lambda c: _with_head(c, norm_eps=torch.tensor(1e-5)), TypeError,
        lambda c: ["norm_eps", "Tensor"]),
}


@pytest.mark.parametrize("name", sorted(RAMP_EXIT_INVALID))
@fuzz(8)
@given(call=valid_calls())
def test_invalid_argument_is_refused(name, call):
    """Each spoiled argument raises ValueError / TypeError whose message names the argument and
    says what was expected and what was received (for every pool, batch 0 and 1 included)."""
    assert_refused(RAMP_EXIT_INVALID[name], call)


@fuzz(30)
@given(call=valid_calls())
def test_nan_threshold_means_no_exit(call):
    """A NaN threshold is not refused (reading it would need a host sync): no row exits."""
    result = replace(call, threshold=torch.tensor(math.nan))()
    assert not result.exit_mask.any()


# -- regressions: defects the properties above found ------------------------------------------

@pytest.mark.parametrize("pool", POOLS)
def test_parameter_hidden_is_accepted(pool):
    """A Tensor subclass misses the fast path's exact-type test; the slow path found nothing
    wrong and used to raise "the head's weight must be on hidden's device cpu; got cpu"."""
    shape = {"avg": (3, 8, 2, 2), "none": (3, 8)}.get(pool, (3, 4, 8))
    hidden = torch.randn(shape)
    head = apparate.RampHead(torch.randn(5, 8), torch.randn(5), pool)
    threshold = torch.tensor(0.3)
    got = apparate.ramp_exit(torch.nn.Parameter(hidden, requires_grad=False), head, threshold)
    want = apparate.ramp_exit(hidden, head, threshold)
    assert torch.equal(got.prediction, want.prediction)
    assert torch.equal(got.exit_mask, want.exit_mask)
    torch.testing.assert_close(got.confidence, want.confidence, rtol=0, atol=0)


@pytest.mark.parametrize("eps", [np.float64(1e-5), np.float32(1e-5), 1e-5, 1])
def test_real_norm_eps_is_accepted(eps):
    """numpy scalars are real numbers (np.float64 is even a float); they used to be refused with
    "norm_eps must be a positive float; got np.float64(1e-05)"."""
    head = apparate.RampHead(torch.randn(3, 8), None, "none", norm="rms",
                             norm_weight=torch.ones(8), norm_eps=eps)
    assert type(head.norm_eps) is float and head.norm_eps == float(eps)
    apparate.ramp_exit(torch.randn(2, 8), head, torch.tensor(0.5))
