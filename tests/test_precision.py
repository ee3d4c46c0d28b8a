"""jaxcnn.precision: gradients in low precision against the float64 truth of the same rounded inputs (issue 19)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
from jaxcnn import cli, gradcheck, precision


def test_error_measures_follow_their_definitions():
    t = np.array([1.0, 2.0, 0.0, 1e-5])
    g = np.array([1.1, 2.0, 0.0, 0.0])
    e = precision.error(g, t)
    assert e.median == pytest.approx(0.05) and e.max == pytest.approx(0.1)  # 1e-5 < 1e-3 * 2: left out
    assert e.norm == pytest.approx(np.linalg.norm(g - t) / np.linalg.norm(t))
    assert e.cosine == pytest.approx(g @ t / np.linalg.norm(g) / np.linalg.norm(t))
    assert e.one_minus_cosine == pytest.approx(1 - g @ t / np.linalg.norm(g) / np.linalg.norm(t), rel=1e-6)
    assert e.flushed == pytest.approx(1 / 3)  # 1e-5 came out 0
    same = precision.error(t, t)
    assert (same.median, same.max, same.norm, same.one_minus_cosine, same.flushed) == (0, 0, 0, 0, 0)
    assert precision.error(g, np.zeros(4)).norm is None


def _net():
    return jc.Sequential([jc.Conv(3, 3, padding=1), jc.ReLU(), jc.MaxPool(), jc.Flatten(), jc.Dense(3)])


def test_truth_is_float64_and_float64_errors_are_zero():
    net = _net()
    params = net.init(jax.random.key(0), (6, 6, 2))
    x = jax.random.normal(jax.random.key(1), (4, 6, 6, 2))
    labels = jnp.array([0, 1, 2, 0])
    with jax.enable_x64(False):  # a user without x64: the check turns it on for the truth
        report = precision.check_precision(net, params, x, labels, dtypes=("float64", "float32", "bfloat16"),
                                           modes=("hand im2col", "autodiff im2col"))  # winograd: the CLI test
    assert report.meta["truth_dtype"] == "float64" and report.meta["float64_spread"] < 1e-13
    by_dtype = {d: [r for r in report.gradients if r.dtype == d] for d in ("float64", "float32", "bfloat16")}
    assert len(by_dtype["float64"]) == 2 * 4  # two modes, conv1/w, conv1/b, dense1/w, dense1/b
    for r in by_dtype["float64"]:
        assert (r.error.median, r.error.max, r.error.norm, r.error.one_minus_cosine, r.forward_norm) == (0, 0, 0, 0, 0)
    for r in [*report.layers, *report.forward]:
        if r.dtype == "float64":
            assert r.error.norm in (0, None), r
    # A truth silently computed in float32 would make every float32 error 0.
    f32 = [r.error.norm for r in by_dtype["float32"]]
    bf16 = [r.error.norm for r in by_dtype["bfloat16"]]
    assert all(0 < e < 1e-5 for e in f32), f32
    assert all(1e-4 < e < 0.2 for e in bf16), bf16
    assert {r.layer for r in report.layers} >= {"layer 0 (Conv(3, padding=1))", "loss"}
    assert "truth: float64" in report.table()
    assert json.loads(report.to_json())["meta"]["dtypes"] == ["float64", "float32", "bfloat16"]


def test_ties_created_by_rounding_are_counted_and_explain_hand_vs_autodiff():
    """S = x1 + x2 = 1 and 1 + 2^-9: 1 + 2^-9 rounds to 1 in bfloat16, a tie with the window's other entry 1 that
    float64 does not have. The hand rule routes Delta to the first maximum, autodiff of our forward splits it."""
    net = jc.Sequential([jc.Conv(1, 1, bias=False), jc.MaxPool(window=(1, 2)), jc.Flatten(), jc.Dense(2)])
    params = {"conv1": {"w": jnp.ones((1, 1, 2, 1))}, "dense1": {"w": jnp.array([[1.0, -1.0]]), "b": jnp.zeros(2)}}
    x = jnp.array([[[[0.5, 0.5], [1.0, 2.0**-9]]]])  # [1, 1, 2, 2]: the window holds S = 1 and 1 + 2^-9
    report = gradcheck.check_precision(net, params, x, jnp.array([0]), dtypes=("bfloat16",),
                                       modes=("hand im2col", "autodiff im2col", "autodiff first-max"))
    (pool,) = [r for r in report.forward if r.index == 1]
    assert (pool.ties, pool.ties_float64) == (1, 0)
    dw = {r.mode: r.error.norm for r in report.gradients if r.gradient == "conv1/w"}
    assert dw["hand im2col"] == pytest.approx(dw["autodiff first-max"]) and dw["hand im2col"] > 0.5
    assert dw["autodiff im2col"] == pytest.approx(dw["hand im2col"] / 2, rel=0.01)  # half of Delta misrouted


def test_bad_arguments_are_named():
    net = _net()
    params = net.init(jax.random.key(0), (6, 6, 2))
    x, labels = jnp.zeros((1, 6, 6, 2)), jnp.array([0])
    with pytest.raises(ValueError, match="modes must be among"):
        precision.check_precision(net, params, x, labels, modes=("hand",))
    with pytest.raises(ValueError, match="loss must be one of"):
        precision.check_precision(net, params, x, labels, loss="hinge")
    with pytest.raises(ValueError, match="dtypes must be floating-point"):
        precision.check_precision(net, params, x, labels, dtypes=("int8",))


def test_cli_gradcheck_precision(capsys, tmp_path):
    config = tmp_path / "net.toml"
    config.write_text('name = "mine"\n[[layers]]\ntype = "conv"\nfeatures = 2\nkernel = 3\n[[layers]]\n'
                      'type = "flatten"\n[[layers]]\ntype = "dense"\nfeatures = 3\n')
    out = tmp_path / "precision.json"
    args = ["gradcheck", "--config", str(config), "--batch", "2", "--input-shape", "5x5x1", "--rule", "winograd"]
    assert cli.main([*args, "--precision", "bfloat16", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "each mode in bfloat16 against the float64 gradient" in text and "truth: float64" in text
    rows = json.loads(out.read_text())["gradients"]
    assert {(r["dtype"], r["mode"]) for r in rows} == {("bfloat16", "hand winograd"), ("bfloat16", "autodiff winograd")}
    assert cli.main([*args, "--precision", "float8"]) == 2
    assert "--precision takes a comma-separated list" in capsys.readouterr().err
    assert cli.main([*args, "--precision", "--dtype", "float32"]) == 2
    assert "--dtype does not apply with --precision" in capsys.readouterr().err


def test_im2col_dz_is_rounded_once_in_bfloat16():
    """Eq. (18)'s W^T Delta and its col2im sum stay in float32 and are rounded once: dZ as close to the truth as
    the flip rule's single convolution (rounding W^T Delta first made it 2.5x farther)."""
    x, w, delta = (jax.random.normal(k, s) for k, s in zip(jax.random.split(jax.random.key(3), 3),
                                                           [(4, 10, 10, 8), (3, 3, 8, 16), (4, 10, 10, 16)]))
    x, w, delta = (a.astype(jnp.bfloat16) for a in (x, w, delta))
    dz = {}
    for rule, dtype in [("im2col", jnp.bfloat16), ("flip", jnp.bfloat16), ("im2col", jnp.float64)]:
        pull = jax.jit(lambda x, w, delta, rule=rule: jax.vjp(lambda x: jc.conv2d(x, w, padding=1, rule=rule), x)[1](
            delta)[0])
        dz[rule, jnp.dtype(dtype).name] = pull(*(a.astype(dtype) for a in (x, w, delta)))
    assert dz["im2col", "bfloat16"].dtype == jnp.bfloat16
    truth = dz["im2col", "float64"]
    im2col, flip = (precision.error(dz[r, "bfloat16"], truth).norm for r in ("im2col", "flip"))
    assert im2col < 1.2 * flip and im2col < 2.5e-3, (im2col, flip)
