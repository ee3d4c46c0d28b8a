"""gradcheck: 0 genuine mismatches on every preset, kinks told apart, and a planted bug caught."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
from jaxcnn import cli, gradcheck
from jaxcnn.ops import conv, pool

# Every preset at a small input (its own size costs only time: the layers are the same).
SMALL = {"digits-cnn": (8, 8, 1), "simplenn-mnist": (12, 12, 1), "lenet5": (16, 16, 1),
         "simplenn-cifar": (8, 8, 3), "vgg-small": (8, 8, 3)}


def preset_check(name, dtype="float64", **kwargs):
    net = jc.preset(name)
    shape = SMALL[name]
    params = net.init(jax.random.key(0), shape, dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (2, *shape), jnp.float64)
    return gradcheck.check_network(net, params, x, jnp.array([3, 7]), dtype=dtype, **kwargs)


@pytest.mark.parametrize("name", list(SMALL))
def test_every_preset_has_no_genuine_mismatch_in_float64(name):
    report = preset_check(name)
    assert report.mismatches == [], report.table()
    params = [r for r in report.rows if "/" in r.name and r.mode != "autodiff"]
    assert len(params) == 2 * 2 * sum(1 for layer in jc.preset(name).layers if layer.prefix)  # w, b x 2 rules
    assert all(r.status == "ok" and r.rel < 1e-12 and r.fd_error < 1e-7 for r in params), report.table()


def test_planted_bug_is_a_genuine_mismatch(monkeypatch):
    real = conv._im2col_backward

    def wrong(*args):  # dW off by 0.1%: the kind of slip a hand derivation makes
        dx, dw, db = real(*args)
        return dx, dw * 1.001, db

    monkeypatch.setattr(conv, "_im2col_backward", wrong)
    report = preset_check("digits-cnn", activations=False)
    flagged = {(r.name, r.mode) for r in report.mismatches}
    assert flagged == {("conv1/w", "hand im2col"), ("conv2/w", "hand im2col")}, report.table()
    assert all(r.status == "ok" for r in report.rows if r.mode == "hand flip")


def test_planted_routing_bug_in_max_pool_is_caught(monkeypatch):
    def to_last(win, index, delta, in_hw):  # route every Delta to the last window entry instead of the maximum
        cols = jnp.zeros((*delta.shape[:3], *win.size, delta.shape[3]), delta.dtype).at[:, :, :, -1, -1].set(delta)
        return pool.unpatches(cols, win, in_hw)

    x = jnp.asarray(np.random.default_rng(0).permutation(64).reshape(1, 8, 8, 1), jnp.float64)
    assert gradcheck.check_op(jc.max_pool2d, (x,), ("x",), window=2).mismatches == []
    monkeypatch.setattr(pool, "route", to_last)
    report = gradcheck.check_op(jc.max_pool2d, (x,), ("x",), window=2)
    assert [(r.name, r.mode) for r in report.mismatches] == [("x", "hand")], report.table()


def test_ties_are_reported_as_expected_not_as_mismatches():
    x = jnp.asarray([[5.0, 5, 1, 2], [0, 5, 3, 1], [1, 2, 3, 4], [4, 3, 2, 1]]).reshape(1, 4, 4, 1)
    report = gradcheck.check_op(jc.max_pool2d, (x,), ("x",), window=2)
    assert report.kinks == {"max_pool2d": {"tied_windows": 1}}
    (hand,) = [r for r in report.rows if r.mode == "hand"]
    assert hand.status == "kink" and hand.rel > 0.1 and "first-maximum convention" in hand.note
    assert report.mismatches == []


def test_relu_kinks_in_a_network_are_counted_and_expected(capsys, tmp_path):
    out = tmp_path / "report.json"
    code = cli.main(["gradcheck", "--preset", "digits-cnn", "--input", "zeros", "--batch", "2", "--rule", "flip",
                     "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "genuine mismatches: 0" in text and "relu zeros" in text and "tied windows" in text
    report = json.loads(out.read_text())
    assert report["mismatches"] == 0 and report["kinks"]["layer 1 (ReLU())"]["relu_zeros"] == 2 * 8 * 8 * 32
    assert {r["status"] for r in report["rows"]} == {"ok", "kink"}


def test_cli_exits_non_zero_on_a_genuine_mismatch(monkeypatch, capsys):
    real = conv._flip_backward
    monkeypatch.setattr(conv, "_flip_backward", lambda *a: (real(*a)[0] * -1, real(*a)[1]))  # sign slip in dZ
    assert cli.main(["gradcheck", "--preset", "digits-cnn", "--batch", "2", "--rule", "flip"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "genuine mismatches: 0" not in out


@pytest.mark.parametrize("rule", ["im2col", "flip"])
def test_check_op_on_a_strided_dilated_conv(rule):
    rng = np.random.default_rng(2)
    x, w, b = rng.normal(size=(2, 9, 8, 3)), rng.normal(size=(3, 2, 3, 4)), rng.normal(size=(4,))
    report = gradcheck.check_op(jc.conv2d, (x, w, b), ("x", "w", "b"), stride=(2, 1), dilation=(1, 2),
                                padding="SAME")
    assert report.mismatches == [] and {r.status for r in report.rows} == {"ok"}
    assert {r.mode for r in report.rows} == {"hand im2col", "hand flip", "autodiff"}


def test_float32_and_bfloat16_reports():
    for dtype in ("float32", "bfloat16"):
        report = preset_check("simplenn-mnist", dtype=dtype, activations=False, rules=("im2col",))
        assert report.mismatches == [], report.table()
        assert report.dtype == dtype and report.tolerance == gradcheck.TOLERANCE[dtype]
