"""--precision bf16: the layers' forward and hand backward run in bfloat16 on float32 master params; the loss,
the gradients, the optimizer and the checkpoints stay float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
from jaxcnn import checkpoint, cli, data, objective, train

DIGITS = data.load("digits")


def test_the_layers_compute_in_bfloat16_and_the_gradient_comes_back_in_float32():
    net = jc.preset("digits-cnn")
    params = net.init(jax.random.key(0), (8, 8, 1))
    x, y = jnp.asarray(DIGITS.x_train[:64]), jnp.asarray(DIGITS.y_train[:64])

    def f(params, compute_dtype):
        return objective.objective(params, net, x, y, compute_dtype=compute_dtype)[0]

    jaxpr = jax.make_jaxpr(jax.grad(f), static_argnums=1)(params, jnp.bfloat16).jaxpr
    operands = [[str(v.aval.dtype) for v in eqn.invars] for eqn in _equations(jaxpr)
                if eqn.primitive.name in ("dot_general", "conv_general_dilated")]
    assert operands and all(o == ["bfloat16"] * 2 for o in operands), operands  # every product of the step in bf16
    grad_f32, grad_bf16 = jax.jit(lambda p: (jax.grad(f)(p, None), jax.grad(f)(p, jnp.bfloat16)))(params)
    for name in grad_f32:
        for key in grad_f32[name]:
            g32, g16 = np.asarray(grad_f32[name][key]), np.asarray(grad_bf16[name][key])
            assert g16.dtype == np.float32, (name, key)
            cosine = np.sum(g32 * g16) / (np.linalg.norm(g32) * np.linalg.norm(g16))
            assert cosine > 0.999, (name, key, cosine)  # the same gradient, to bfloat16's rounding ...
            assert not np.array_equal(g32, g16), (name, key)  # ... which is there
    value, value_f32 = jax.jit(lambda p: (f(p, jnp.bfloat16), f(p, None)))(params)
    assert value.dtype == jnp.float32 and abs(float(value) - float(value_f32)) < 0.02


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside its equations (custom rules, jit, scan)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def test_a_bf16_run_keeps_float32_params_and_trains_as_well(tmp_path, capsys):
    for precision in ("fp32", "bf16"):
        assert cli.main(["train", "--epochs", "3", "--precision", precision, "--no-progress",
                         "--out", str(tmp_path / precision)]) == 0
    assert "precision=bf16" in capsys.readouterr().out
    fp32, bf16 = (checkpoint.load_model(tmp_path / p) for p in ("fp32", "bf16"))
    assert all(a.dtype == np.float32 for a in jax.tree_util.tree_leaves(bf16.params))
    assert bf16.meta["train"]["precision"] == "bf16"
    acc = {p: m.meta["test"]["accuracy"] for p, m in (("fp32", fp32), ("bf16", bf16))}
    assert acc["bf16"] > 0.9 and abs(acc["bf16"] - acc["fp32"]) < 0.03, acc
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "bf16")]) == 0  # evaluated in bf16 again
    assert f"{acc['bf16']:.2%}" in capsys.readouterr().out


@pytest.mark.parametrize("change, match", [
    ({"precision": "fp16"}, "precision must be 'fp32' or 'bf16', got 'fp16'"),
    ({"precision": "bf16", "optimizer": "newton"}, "precision apply to the first-order optimizers, not newton"),
])
def test_bad_precisions_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        train.TrainConfig(**change)
