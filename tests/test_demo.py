"""The demo (README's first command) runs through the CLI and reports agreeing gradients."""

import re

from jaxcnn import cli


def test_demo_reports_hand_and_autodiff_agree(capsys):
    assert cli.main(["demo", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    for param in ("conv1/w", "conv1/b", "conv2/w", "dense/w"):
        assert param in out
    worst = re.search(r"largest relative difference: float64 (\S+), float32 (\S+)", out)
    assert worst, out
    assert float(worst[1]) < 1e-12 and float(worst[2]) < 1e-5, out


def test_both_dtypes_start_from_the_same_weights():
    """The float32 and float64 columns differ by rounding only: one draw of weights and batch, then cast."""
    import jax.numpy as jnp

    from jaxcnn import demo

    (f64, _), (f32, _) = demo.compare(jnp.float64), demo.compare(jnp.float32)
    assert abs(f32["autodiff"] - f64["autodiff"]) <= 1e-6 * abs(f64["autodiff"]), (f32, f64)
