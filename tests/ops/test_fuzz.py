"""Random arguments, valid or not: a valid call matches autodiff, an invalid one raises the documented
ValueError/TypeError naming the op, and nothing else happens (no other exception, no crash).

Each case draws a plausible call and, for every kind of corruption in turn, corrupts one argument (a wrong rank,
a channel mismatch, an integer dtype, a zero or fractional stride, an unknown padding or mode, ...); a plausible
call may be invalid too (a kernel larger than the padded input). To see how many cases of each kind ran:

    pytest tests/ops/test_fuzz.py --hypothesis-show-statistics
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import jaxcnn as jc
from tests.helpers import assert_modes_agree

S = jax.ShapeDtypeStruct
pair = st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3)))
padding = st.one_of(st.sampled_from(["VALID", "SAME", "same"]), st.integers(0, 2),
                    st.tuples(st.tuples(st.integers(0, 2), st.integers(0, 2)),
                              st.tuples(st.integers(0, 2), st.integers(0, 2))))
BAD_PAIRS = [0, -1, (1, 0), 1.5, "2", (1, 2, 3), None, True]
BAD_PADDINGS = ["FULL", -1, ((1, -1), (0, 0)), 1.0, None, (1, 2, 3)]


def outcome(op_name, f, *structs):
    """'valid' (the call traces), or 'invalid' after checking the error is the documented kind."""
    try:
        jax.eval_shape(f, *structs)
    except (ValueError, TypeError) as err:
        assert str(err).startswith(f"{op_name}: "), f"the error does not name the op: {err}"
        event(f"{op_name} invalid: {type(err).__name__}")
        return "invalid"
    event(f"{op_name} valid")
    return "valid"


def values(structs, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=s.shape), s.dtype) for s in structs]


def corrupt(data, case: dict, corruptions: dict, name: str) -> dict:
    """The case as drawn ("none"), or with one argument corrupted as ``name`` says."""
    event(f"corrupted: {name}")
    return case if name == "none" else {**case, **corruptions[name](data, case)}


CONV_CORRUPTIONS = {
    "x rank": lambda d, c: {"x": S(c["x"].shape[1:], c["x"].dtype)},
    "w rank": lambda d, c: {"w": S(c["w"].shape[:3], c["w"].dtype)},
    "channels": lambda d, c: {"w": S((*c["w"].shape[:2], c["w"].shape[2] + 1, c["w"].shape[3]), c["w"].dtype)},
    "int x": lambda d, c: {"x": S(c["x"].shape, jnp.int32)},
    "dtype mix": lambda d, c: {"w": S(c["w"].shape, jnp.float32 if c["x"].dtype == jnp.float64 else jnp.float64)},
    "zero kernel": lambda d, c: {"w": S((0, *c["w"].shape[1:]), c["w"].dtype)},
    "bias shape": lambda d, c: {"b": S((c["w"].shape[3] + 1,), c["w"].dtype)},
    "stride": lambda d, c: {"stride": d.draw(st.sampled_from(BAD_PAIRS))},
    "dilation": lambda d, c: {"dilation": d.draw(st.sampled_from(BAD_PAIRS))},
    "padding": lambda d, c: {"padding": d.draw(st.sampled_from(BAD_PADDINGS))},
    "grad": lambda d, c: {"grad": "exact"},
    "rule": lambda d, c: {"rule": "fft"},
    "store_phi": lambda d, c: {"store_phi": d.draw(st.sampled_from(["yes", 1, 0.0]))},
    "store_phi with flip": lambda d, c: {"rule": "flip", "store_phi": True},
}


@pytest.mark.parametrize("corruption", ["none", *CONV_CORRUPTIONS])
@settings(max_examples=8)
@given(data=st.data())
def test_conv2d_random_arguments(corruption, data):
    dtype = data.draw(st.sampled_from([jnp.float64, jnp.float32]))
    n, h, w_, c = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6)),
                   data.draw(st.integers(1, 3)))
    c_out = data.draw(st.integers(1, 3))
    case = corrupt(data, dict(
        x=S((n, h, w_, c), dtype), w=S((data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)), c, c_out), dtype),
        b=S((c_out,), dtype) if data.draw(st.booleans()) else None, stride=data.draw(pair),
        dilation=data.draw(st.one_of(st.just(1), pair)), padding=data.draw(padding), grad="hand",
        rule=(rule := data.draw(st.sampled_from(["im2col", "flip"]))),
        store_phi=data.draw(st.sampled_from([None, False, True] if rule == "im2col" else [None, False]))),
        CONV_CORRUPTIONS, corruption)
    kw = {k: case[k] for k in ("stride", "dilation", "padding", "store_phi")}
    f = lambda x, w, b: jc.conv2d(x, w, b, **kw, grad=case["grad"], rule=case["rule"])
    if outcome("conv2d", f, case["x"], case["w"], case["b"]) == "valid":
        structs = [s for s in (case["x"], case["w"], case["b"]) if s is not None]
        assert_modes_agree(lambda *a, **m: jc.conv2d(*a, **kw, **m), values(structs), ("x", "w", "b"), dtype,
                           f"conv2d {case}", {"autodiff": {"grad": "autodiff"}, "hand": {"rule": case["rule"]}})


POOL_CORRUPTIONS = {
    "x rank": lambda d, c: {"x": S(c["x"].shape[1:], c["x"].dtype)},
    "int x": lambda d, c: {"x": S(c["x"].shape, jnp.int32)},
    "window": lambda d, c: {"window": d.draw(st.sampled_from(BAD_PAIRS))},
    "stride": lambda d, c: {"stride": d.draw(st.sampled_from([b for b in BAD_PAIRS if b is not None]))},
    "padding": lambda d, c: {"padding": d.draw(st.sampled_from(BAD_PADDINGS))},
    "padding >= window": lambda d, c: {"padding": ((3, 0), (0, 0))},
    "grad": lambda d, c: {"grad": "exact"},
}


@pytest.mark.parametrize("corruption", ["none", *POOL_CORRUPTIONS])
@settings(max_examples=8)
@given(data=st.data())
def test_pooling_random_arguments(corruption, data):
    op = data.draw(st.sampled_from([jc.max_pool2d, jc.avg_pool2d]))
    dtype = data.draw(st.sampled_from([jnp.float64, jnp.float32]))
    window = data.draw(pair)
    pads = data.draw(st.one_of(st.sampled_from(["VALID", "SAME"]), st.just(0)))
    case = corrupt(data, dict(
        x=S((data.draw(st.integers(1, 2)), data.draw(st.integers(1, 7)), data.draw(st.integers(1, 7)),
             data.draw(st.integers(1, 3))), dtype),
        window=window, stride=data.draw(st.one_of(st.none(), pair)), padding=pads, grad="hand"), POOL_CORRUPTIONS,
        corruption)
    kw = {k: case[k] for k in ("window", "stride", "padding")}
    if outcome(op.__name__, lambda x: op(x, **kw, grad=case["grad"]), case["x"]) == "valid":
        x = case["x"]
        distinct = jnp.asarray(np.random.default_rng(1).permutation(int(np.prod(x.shape))).reshape(x.shape), dtype)
        assert_modes_agree(lambda x, **m: op(x, **kw, **m), [distinct], ("x",), dtype, f"{op.__name__} {kw}",
                           {"autodiff": {"grad": "autodiff"}, "hand": {"grad": "hand"}})


DENSE_CORRUPTIONS = {
    "x rank": lambda d, c: {"x": S((*c["x"].shape, 1), c["x"].dtype)},
    "sizes": lambda d, c: {"w": S((c["w"].shape[0] + 1, c["w"].shape[1]), c["w"].dtype)},
    "int x": lambda d, c: {"x": S(c["x"].shape, jnp.int32)},
    "grad": lambda d, c: {"grad": "exact"},
}


@pytest.mark.parametrize("corruption", ["none", *DENSE_CORRUPTIONS])
@settings(max_examples=8)
@given(data=st.data())
def test_dense_and_loss_random_arguments(corruption, data):
    dtype = data.draw(st.sampled_from([jnp.float64, jnp.float32]))
    n, n_in, n_out = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    case = corrupt(data, dict(x=S((n, n_in), dtype), w=S((n_in, n_out), dtype), grad="hand"), DENSE_CORRUPTIONS,
                   corruption)
    if outcome("dense", lambda x, w: jc.dense(x, w, grad=case["grad"]), case["x"], case["w"]) == "valid":
        assert_modes_agree(lambda *a, **m: jc.dense(*a, **m), values([case["x"], case["w"]]), ("x", "w"), dtype,
                           "dense", {"autodiff": {"grad": "autodiff"}, "hand": {"grad": "hand"}})
    loss = data.draw(st.sampled_from([jc.softmax_cross_entropy, jc.squared_error]))
    labels = data.draw(st.sampled_from(["int", "rows", "wrong count", "wrong width", "int matrix"]))
    y = {"int": S((n,), jnp.int32), "rows": S((n, n_out), dtype), "wrong count": S((n + 1,), jnp.int32),
         "wrong width": S((n, n_out + 1), dtype), "int matrix": S((n, n_out), jnp.int32)}[labels]
    if outcome(loss.__name__, lambda z, y: loss(z, y), S((n, n_out), dtype), y) == "valid":
        z = values([S((n, n_out), dtype)])[0]
        # targets from another seed: softmax(z) == y would make the true gradient 0 and leave only rounding
        y = jnp.zeros(n, jnp.int32) if labels == "int" else jax.nn.softmax(values([y], seed=1)[0])
        assert_modes_agree(lambda z, **m: loss(z, y, **m), [z], ("z",), dtype, loss.__name__,
                           {"autodiff": {"grad": "autodiff"}, "hand": {"grad": "hand"}})
