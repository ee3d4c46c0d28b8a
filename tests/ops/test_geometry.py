"""Every op's hand gradient equals autodiff on every class of window geometry, including the degenerate ones.

The fuzz tests (test_fuzz.py) draw plausible geometries; the audit of issue 13 found a crash they never drew: a
kernel offset that reads only padding (col2im sliced past the end). Here the geometry is drawn from the whole valid
range, padding up to the full dilated kernel extent on each side (pooling: up to the window less one, as
``max_pool2d`` requires) and inputs as small as one pixel, and each test asks for one geometry class along at least
one axis (drawn from a list of every one-axis geometry of that class), so that every class is drawn however the
random draws fall:

    one pixel       the input is 1 pixel high or wide
    padding before  some kernel offset reads only the top (left) padding, at every output position: it adds
                    nothing to dZ (the audit's crash)
    padding after   ... only the bottom (right) padding
    dropped rows    rows past the last window: never read, zero gradient
    gaps            stride > window extent: rows between windows are never read
    plain           none of the above

The counts drawn per op family and class are printed at the end of the test session (tests/conftest.py).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import jaxcnn as jc
from jaxcnn.ops._windows import Window, _reads_input
from tests.helpers import GEOMETRY_COUNTS, assert_modes_agree

CLASSES = ("one pixel", "padding before", "padding after", "dropped rows", "gaps", "plain")
EXAMPLES = 5  # per op family and class


def classes(n, k, s, d, lo, hi) -> set[str]:
    """The geometry classes of one axis: n inputs, kernel k, stride s, dilation d, padding (lo, hi)."""
    extent, padded = d * (k - 1) + 1, n + lo + hi
    out = (padded - extent) // s + 1
    found = set()
    if n == 1:
        found.add("one pixel")
    reads = [[o * s + i * d - lo for o in range(out)] for i in range(k)]  # input rows read by each offset
    if any(max(rows) < 0 for rows in reads):
        found.add("padding before")
    if any(min(rows) >= n for rows in reads):
        found.add("padding after")
    if (out - 1) * s + extent < padded:
        found.add("dropped rows")
    if s > extent and out > 1:
        found.add("gaps")
    return found or {"plain"}


def axes(family: str) -> list[tuple]:
    """Every valid geometry of one axis: n <= 5 inputs, kernel k <= 3, stride s <= 3, dilation d <= 2 (conv) or 1
    (pooling), padding (lo, hi) up to the dilated extent (conv) or the window less one (pooling)."""
    found = []
    for n, k, s, d in itertools.product(range(1, 6), range(1, 4), range(1, 4), (1, 2) if family == "conv" else (1,)):
        most = d * (k - 1) + 1 if family == "conv" else k - 1
        found += [(n, k, s, d, lo, hi) for lo in range(most + 1) for hi in range(most + 1)
                  if n + lo + hi >= d * (k - 1) + 1]  # the window fits the padded input
    return found


AXES = {family: axes(family) for family in ("conv", "pool")}


def draw_axes(data, family: str, geometry_class: str) -> list[tuple]:
    """(height, width) geometries: one axis of the class, the other any; in random order."""
    of_class = [a for a in AXES[family] if geometry_class in classes(*a)]
    pair = [data.draw(st.sampled_from(of_class)), data.draw(st.sampled_from(AXES[family]))]
    if data.draw(st.booleans()):
        pair.reverse()
    for c in classes(*pair[0]) | classes(*pair[1]):
        GEOMETRY_COUNTS[family, c] += 1
        event(f"{family}: {c}")
    return pair


@pytest.mark.parametrize("geometry_class", CLASSES)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_conv_and_fused_block(geometry_class, data):
    """conv2d by im2col (phi stored and recomputed) and flip, and conv_relu_pool where a pool window fits, all
    equal autodiff through the same forward in float64."""
    (h, kh, sh, dh, top, bottom), (w, kw, sw, dw, left, right) = draw_axes(data, "conv", geometry_class)
    geometry = dict(stride=(sh, sw), dilation=(dh, dw), padding=((top, bottom), (left, right)))
    out_hw = [jc.output_size(n, k, s, p, d) for n, k, s, p, d in ((h, kh, sh, (top, bottom), dh),
                                                                   (w, kw, sw, (left, right), dw))]
    pool = data.draw(st.integers(1, 2)) if min(out_hw) >= 2 else 1
    rng = np.random.default_rng(0)
    x, wk, b = (jnp.asarray(rng.normal(size=s), jnp.float64) for s in ((2, h, w, 2), (kh, kw, 2, 3), (3,)))

    def f(x, wk, b, **mode):
        s = jc.conv2d(x, wk, b, **geometry, **mode)
        z = jc.conv_relu_pool(x, wk, b, **geometry, pool=pool, **mode)
        return jnp.concatenate([s.ravel(), z.ravel()])

    assert_modes_agree(f, (x, wk, b), ("x", "w", "b"), jnp.float64, f"conv {geometry} pool {pool}", {
        "autodiff": {"grad": "autodiff"}, "im2col stored": {"rule": "im2col", "store_phi": True},
        "im2col": {"rule": "im2col", "store_phi": False}, "flip": {"rule": "flip"}})


@pytest.mark.parametrize("geometry_class", CLASSES)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_max_and_avg_pooling(geometry_class, data):
    """max_pool2d (distinct values: no ties) and avg_pool2d equal autodiff in float64."""
    (h, kh, sh, _, top, bottom), (w, kw, sw, _, left, right) = draw_axes(data, "pool", geometry_class)
    geometry = dict(window=(kh, kw), stride=(sh, sw), padding=((top, bottom), (left, right)))
    x = jnp.asarray(np.random.default_rng(1).permutation(2 * h * w).reshape(1, h, w, 2), jnp.float64)

    def f(x, **mode):
        return jnp.concatenate([jc.max_pool2d(x, **geometry, **mode).ravel(),
                                jc.avg_pool2d(x, **geometry, **mode).ravel()])

    assert_modes_agree(f, (x,), ("x",), jnp.float64, f"pooling {geometry}",
                       {"autodiff": {"grad": "autodiff"}, "hand": {"grad": "hand"}})


def test_the_audit_examples():
    """Issue 13's two reproductions: a one-pixel input whose first kernel columns read only padding."""
    x = jnp.ones((1, 1, 1, 1))
    for rule in ("im2col", "flip"):
        conv = lambda x, rule=rule: jc.conv2d(x, jnp.ones((1, 3, 1, 1)), padding=((0, 0), (2, 0)), rule=rule)
        g = jax.grad(lambda x, conv=conv: conv(x).sum())(x)
        np.testing.assert_array_equal(g, [[[[1.0]]]])  # only the last kernel column reads the pixel
    x = jnp.arange(3.0).reshape(1, 1, 3, 1)
    for op, expected in ((jc.max_pool2d, [0, 0, 1]), (jc.avg_pool2d, [1 / 9] * 3)):
        g = jax.grad(lambda x, op=op: op(x, (3, 3), 1, ((2, 0), (0, 0))).sum())(x)
        np.testing.assert_allclose(g.ravel(), expected, rtol=1e-15)



@pytest.mark.parametrize("family", ["conv", "pool"])
def test_col2im_reads_the_rows_each_offset_reads_on_every_axis_geometry(family):
    """The index arithmetic of col2im (``_reads_input``: which output positions of a kernel offset read the input
    rather than padding), checked against its definition on every one-axis geometry of the family."""
    for n, k, s, d, lo, hi in AXES[family]:
        window = Window((k, 1), (s, 1), (d, 1), ((lo, hi), (0, 0)))
        out = window.out_hw((n, 1))[0]
        for i in range(k):
            reading = [o for o in range(out) if 0 <= o * s + i * d - lo < n]
            first, last = _reads_input(i * d, out, n, window, 0)
            assert list(range(first, last + 1)) == reading, (n, k, s, d, lo, hi, i)
