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


# Two presets in the default suite (their layers are those of the rest); all of them with -m slow.
@pytest.mark.parametrize("name", [name if name in ("digits-cnn", "simplenn-cifar") else
                                  pytest.param(name, marks=pytest.mark.slow) for name in SMALL])
def test_every_preset_has_no_genuine_mismatch_in_float64(name):
    # The network's gradients by each rule, against autodiff and finite differences; layer-by-layer rows are
    # checked on digits-cnn by the tests below.
    report = preset_check(name, layers=False)
    assert report.mismatches == [], report.table()
    params = [r for r in report.rows if "/" in r.name and r.mode != "autodiff"]
    assert len(params) == 2 * 2 * sum(1 for layer in jc.preset(name).layers if layer.prefix)  # w, b x 2 rules
    assert all(r.status == "ok" and r.rel < 1e-12 and r.fd_error < 1e-7 for r in params), report.table()


def test_the_resnet_preset_has_no_genuine_mismatch():
    net = jc.preset("resnet-small")
    params = net.init(jax.random.key(0), (8, 8, 3), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3), jnp.float64)
    report = gradcheck.check_network(net, params, x, jnp.array([3, 7]), rules=("im2col",), layers=False)
    assert report.mismatches == [], report.table()
    assert any(r.name.endswith("gamma") for r in report.rows), report.table()


def test_planted_bug_is_a_genuine_mismatch(monkeypatch):
    real = conv._im2col_backward

    def wrong(*args):  # dW off by 0.1%: the kind of slip a hand derivation makes
        dx, dw, db = real(*args)
        return dx, dw * 1.001, db

    monkeypatch.setattr(conv, "_im2col_backward", wrong)
    report = preset_check("digits-cnn", layers=False)
    flagged = {(r.name, r.mode) for r in report.mismatches}
    assert flagged == {("conv1/w", "hand im2col"), ("conv2/w", "hand im2col")}, report.table()
    assert all(r.status == "ok" for r in report.rows if r.mode == "hand flip")


def test_a_wrong_rule_in_a_middle_layer_is_blamed_on_that_layer_alone(monkeypatch):
    """Issue 13: the faulty layer's row said ok while an earlier layer's output was flagged. Each layer's VJP is
    now checked alone; a dZ bug planted in the second conv (layer 3 of digits-cnn) is named there and only there,
    and the end-to-end gradients it spoils upstream say where they got it from."""
    real = conv._im2col_backward

    def wrong_in_conv2(window, x, w, delta, stored_phi=None):
        dx, dw, db = real(window, x, w, delta, stored_phi)
        return (dx * 1.01 if w.shape[3] == 64 else dx), dw, db  # conv2 alone: 32 -> 64 channels

    monkeypatch.setattr(conv, "_im2col_backward", wrong_in_conv2)
    report = preset_check("digits-cnn")
    named = [(r.layer, r.mode) for r in report.mismatches]
    assert named == [("layer 3 (Conv(64, padding=1))", "hand im2col")], report.table()
    (blamed,) = report.mismatches
    assert blamed.gradient == "x" and 0.005 < blamed.error < 0.02
    assert all(r.status in ("ok", "kink") for r in report.layers if r is not blamed), report.table()
    spoiled = {r.name for r in report.rows if r.status == "propagated"}
    assert spoiled == {"conv1/w", "conv1/b", "input x"}, report.table()  # upstream of conv2's dZ, im2col only
    assert all("from layer 3" in r.note for r in report.rows if r.status == "propagated")
    text = report.table()
    assert "genuine mismatches: 1: layer 3 (Conv(64, padding=1)) [hand im2col]" in text


def test_float64_check_without_x64_computes_in_float64(recwarn):
    """Issue 13: with jax_enable_x64 off, a float64 check silently ran in float32 and reported dozens of false
    mismatches. The check turns x64 on for its own duration; params built while it was off are upcast."""
    with jax.enable_x64(False):
        net = jc.preset("digits-cnn")
        params = net.init(jax.random.key(0), (8, 8, 1))
        x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
        report = gradcheck.check_network(net, params, x, jnp.array([3, 7]), rules=("flip",))
        op_report = gradcheck.check_op(jc.dense, (x.reshape(2, -1), params["dense1"]["w"][:64]), ("x", "w"))
        assert not jax.config.jax_enable_x64  # restored
    for r in (report, op_report):
        assert r.dtype == "float64" and r.mismatches == [], r.table()
        hand = [row for row in r.rows if row.mode != "autodiff"]
        assert max(row.rel for row in hand) < 1e-12 and max(row.fd_error for row in hand) < 1e-7, r.table()


def test_report_prints_no_uninformative_numbers():
    """All-zero gradients have no cosine ('-', not 1.0); autodiff's rows carry only their finite-difference error."""
    x = -jnp.ones((2, 3))  # ReLU is off everywhere: every gradient is 0
    report = gradcheck.check_op(jc.relu, (x,), ("x",))
    (hand,) = [r for r in report.rows if r.mode == "hand"]
    (auto,) = [r for r in report.rows if r.mode == "autodiff"]
    assert hand.cosine is None and hand.rel == 0 and hand.status == "ok"
    assert auto.rel is auto.cosine is auto.max_abs is None and auto.fd_error is not None
    line = next(line for line in report.table().splitlines() if line.startswith("x ") and "autodiff" in line)
    assert line.split()[2:6] == ["-", "-", "-", "-"]


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


def test_cli_input_shape_is_chosen_and_said(capsys, tmp_path):
    """Issue 13: --config silently assumed the digits' 8x8x1. --input-shape sets it; the output says which shape,
    where it came from, the dtype and the input kind."""
    config = tmp_path / "net.toml"
    config.write_text('name = "mine"\n[[layers]]\ntype = "conv"\nfeatures = 2\nkernel = 3\n[[layers]]\n'
                      'type = "flatten"\n[[layers]]\ntype = "dense"\nfeatures = 3\n')
    assert cli.main(["gradcheck", "--config", str(config), "--batch", "1", "--input-shape", "5x4x2"]) == 0
    out = capsys.readouterr().out
    assert "input 1 x 5x4x2 (--input-shape), values: random (--input), gradients in float64" in out
    assert "genuine mismatches: 0" in out
    assert cli.main(["gradcheck", "--config", str(config), "--batch", "1", "--dtype", "float32"]) == 0
    assert "input 1 x 8x8x1 (the input of dataset digits)" in capsys.readouterr().out
    assert cli.main(["gradcheck", "--config", str(config), "--input-shape", "2x2x2"]) == 2  # kernel 3 > 2
    assert "layer 0 (Conv(2)) does not fit its input of shape 2x2x2" in capsys.readouterr().err
    assert cli.main(["gradcheck", "--batch", "0"]) == 2
    with pytest.raises(SystemExit) as exit_:
        cli.main(["gradcheck", "--input-shape", "28x28"])
    assert exit_.value.code == 2 and "expected HxWxC" in capsys.readouterr().err


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
        report = preset_check("simplenn-mnist", dtype=dtype, layers=False, rules=("im2col",))
        assert report.mismatches == [], report.table()
        assert report.dtype == dtype and report.tolerance == gradcheck.TOLERANCE[dtype]


def test_winograd_is_checked_on_the_layers_it_computes(monkeypatch):
    """rule "winograd" goes to the 3x3, stride-1 conv layers, the others keep the backend's default; its layer rows
    name only those layers; a slip in its dW is caught and blamed on them."""
    from jaxcnn.ops import winograd

    net = jc.Sequential([jc.Conv(3, 3, padding=1), jc.ReLU(), jc.Conv(4, 5, stride=2, padding=2), jc.Flatten(),
                         jc.Dense(3)])
    params = net.init(jax.random.key(0), (7, 6, 2), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (2, 7, 6, 2), jnp.float64)
    check = lambda: gradcheck.check_network(net, params, x, jnp.array([0, 2]), rules=("winograd",))
    report = check()
    assert report.mismatches == [] and {r.mode for r in report.rows} == {"hand winograd", "autodiff"}
    assert all(r.rel < 1e-12 for r in report.rows if r.mode == "hand winograd"), report.table()
    assert [r.layer for r in report.layers if r.mode == "hand winograd"] == ["layer 0 (Conv(3, padding=1))"]

    real = winograd.gradients
    monkeypatch.setattr(winograd, "gradients", lambda *a: (lambda g: (g[0], g[1] * 1.001))(real(*a)))
    flagged = {(r.layer, r.mode) for r in check().mismatches if isinstance(r, gradcheck.LayerRow)}
    assert flagged == {("layer 0 (Conv(3, padding=1))", "hand winograd")}, flagged


def test_check_op_adds_winograd_where_it_applies():
    rng = np.random.default_rng(3)
    x, w, b = rng.normal(size=(2, 5, 6, 2)), rng.normal(size=(3, 3, 2, 3)), rng.normal(size=(3,))
    report = gradcheck.check_op(jc.conv2d, (x, w, b), ("x", "w", "b"), padding=1)
    assert report.mismatches == [] and {r.mode for r in report.rows} == {"hand im2col", "hand flip",
                                                                            "hand winograd", "autodiff"}
