"""Network-level second order on the hand rules: J v, J^T u and simpleNN's Gauss-Newton product G v."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jaxcnn as jc
from jaxcnn import second_order
from tests.helpers import assert_close

SMALL = {"digits-cnn": (8, 8, 1), "simplenn-mnist": (12, 12, 1), "lenet5": (16, 16, 1)}


def setup(name, shape, batch=3, dtype=jnp.float64, seed=0):
    net = jc.preset(name)
    params = net.init(jax.random.key(seed), shape, dtype=dtype)
    keys = jax.random.split(jax.random.key(seed + 1), 3)
    x = jax.random.normal(keys[0], (batch, *shape), dtype)
    flat, unravel = ravel_pytree(params)
    v = unravel(jax.random.normal(keys[1], flat.shape, dtype))
    return net, params, x, v


@pytest.mark.parametrize("name", list(SMALL))
def test_network_jv_equals_jvp_of_autodiff_and_is_adjoint_to_the_hand_vjp(name):
    net, params, x, v = setup(name, SMALL[name])
    fused = net.fuse()

    @jax.jit
    def run(params, x, v):
        z, jv = second_order.jvp(net, params, x, v)
        _, jv_fused = second_order.jvp(fused, params, x, v, rule="flip")
        z_ad, jv_ad = second_order.jvp(net, params, x, v, grad="autodiff")
        u = jnp.sin(jnp.arange(z.size, dtype=z.dtype).reshape(z.shape))
        jtu = second_order.vjp(net, params, x, u)
        return z, jv, jv_fused, z_ad, jv_ad, jnp.vdot(u, jv), ravel_pytree(jtu)[0] @ ravel_pytree(v)[0]

    z, jv, jv_fused, z_ad, jv_ad, u_jv, jtu_v = run(params, x, v)
    assert_close(z, z_ad, jnp.float64, f"{name} output")
    assert_close(jv, jv_ad, jnp.float64, f"{name} Jv")
    assert_close(jv_fused, jv_ad, jnp.float64, f"{name} fused Jv")
    assert abs(float(u_jv - jtu_v)) <= 1e-12 * abs(float(u_jv)), (float(u_jv), float(jtu_v))


@pytest.mark.parametrize("loss", ["squared", "ce"])
def test_gauss_newton_product_equals_the_explicit_matrix(loss):
    """G v against G = (lambda + 1/C) I + (1/|S|) sum_i J_i^T B_i J_i built from jax.jacfwd of the autodiff network
    and jax.hessian of each example's loss, on a tiny network; in segments of 2 over 5 examples (the last padded)
    and in one."""
    net = jc.Sequential([jc.Conv(2, 3), jc.ReLU(), jc.MaxPool(2), jc.Flatten(), jc.Dense(3)])
    params = net.init(jax.random.key(0), (6, 6, 1), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (5, 6, 6, 1), jnp.float64)
    theta, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.key(2), theta.shape, jnp.float64)
    C, damping = 0.5, 0.3
    xi = {"squared": lambda z: jnp.sum((z - 1.0) ** 2), "ce": lambda z: -jax.nn.log_softmax(z)[1]}[loss]

    @jax.jit
    def explicit(theta):
        G = (damping + 1 / C) * jnp.eye(theta.size)
        for i in range(5):
            J = jax.jacfwd(lambda t, i=i: net.apply(unravel(t), x[i:i + 1], grad="autodiff")[0])(theta)
            B = jax.hessian(xi)(net.apply(params, x[i:i + 1], grad="autodiff")[0])
            G = G + J.T @ B @ J / 5
        return G

    @jax.jit
    def products(params, x, v):
        kw = dict(loss=loss, C=C, damping=damping)
        return [second_order.gauss_newton_product(net, params, source, v, batch_size=batch_size, **kw)
                for batch_size in (2, None)
                for source in (x, second_order.forward(net, params, x, batch_size=batch_size))]

    expected = explicit(theta) @ v
    for gv in products(params, x, unravel(v)):
        np.testing.assert_allclose(ravel_pytree(gv)[0], expected, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("name,rule", [("simplenn-mnist", "im2col"), ("lenet5", "flip"), ("digits-cnn", None)])
def test_a_stored_forward_pass_gives_the_same_product_and_keeps_only_costly_outputs(name, rule):
    """G v from ``forward`` (as CG uses it) equals G v recomputing the forward pass, on the plain and the fused
    network; the stored pass holds the input and each conv / dense output, not the activations or pools."""
    plain, params, x, v = setup(name, SMALL[name], batch=5)
    for net in (plain, plain.fuse()):
        stored = jax.jit(lambda params, x, net=net: second_order.forward(net, params, x, batch_size=2,
                                                                         rule=rule))(params, x)
        kept = [type(layer).__name__ for layer, out in zip(net.layers, stored.stored) if out is not None]
        assert set(kept) <= {"Conv", "ConvReLUPool", "Dense"} and kept.count("Dense") >= 1, kept
        assert stored.stored[-1].shape == (3, 2, *SMALL[name]) and stored.mask.sum() == 5

        @jax.jit
        def products(params, stored, x, v, net=net):
            kw = dict(loss="ce", C=2.0, rule=rule)
            return (second_order.gauss_newton_product(net, params, stored, v, **kw),
                    second_order.gauss_newton_product(net, params, x, v, batch_size=2, **kw))

        a, b = products(params, stored, x, v)
        assert_close(ravel_pytree(a)[0], ravel_pytree(b)[0], jnp.float64, f"{net.name} stored G v")


def test_bad_segment_size_is_refused():
    net, params, x, v = setup("digits-cnn", (8, 8, 1), batch=2)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        second_order.gauss_newton_product(net, params, x, v, batch_size=0)
    with pytest.raises(ValueError, match="C must be > 0"):
        second_order.gauss_newton_product(net, params, x, v, C=-1.0)


def test_a_direction_damping_or_stored_pass_that_does_not_fit_is_refused():
    """A v of other structure or shapes, a negative damping and another network's stored forward pass would give a
    KeyError or a silently wrong G v: each is a ValueError naming what differs."""
    net, params, x, v = setup("digits-cnn", (8, 8, 1), batch=2)
    product = second_order.gauss_newton_product
    with pytest.raises(ValueError, match=r"v must have the structure of params .* only params has an entry "
                                         r"\['dense1'\]\['b'\]"):
        product(net, params, x, {**v, "dense1": {"w": v["dense1"]["w"]}})
    with pytest.raises(ValueError, match=r"jvp: v\['conv1'\]\['b'\] must have the shape of params\['conv1'\]\['b'\] "
                                         r"\(32,\), got \(1,\)"):
        second_order.jvp(net, params, x, {**v, "conv1": {**v["conv1"], "b": jnp.ones(1)}})
    with pytest.raises(ValueError, match=r"damping \(Levenberg-Marquardt's lambda\) must be a number >= 0, got -1.0"):
        product(net, params, x, v, damping=-1.0)
    with pytest.raises(ValueError, match=r"x has no examples \(N=0\)"):
        product(net, params, x[:0], v)
    stored = second_order.forward(net, params, x)
    for other, match in [(net.layers[:3] + net.layers[-2:], r"stored forward pass of a network of 8 layers, but other "
                                                             r"has 5"),
                         ((jc.Conv(8, 3, padding=1), *net.layers[1:]), r"layer 0 \(Conv\(8, padding=1\)\) of other "
                                                                       r"does not match what it stored")]:
        other = jc.Sequential(list(other), name="other")
        other_params = other.init(jax.random.key(0), (8, 8, 1), jnp.float64)
        with pytest.raises(ValueError, match=match):
            product(other, other_params, stored, jax.tree_util.tree_map(jnp.ones_like, other_params))


PSUM_SCRIPT = """
import json
import jax, jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jax.flatten_util import ravel_pytree
import jaxcnn as jc
from jaxcnn import parallel, second_order

net = jc.preset("digits-cnn")
params = net.init(jax.random.key(0), (8, 8, 1))
x = jax.random.normal(jax.random.key(1), (12, 8, 8, 1))
flat, unravel = ravel_pytree(params)
v = unravel(jax.random.normal(jax.random.key(2), flat.shape))
kw = dict(loss="ce", C=10.0, damping=0.5, batch_size=2)
one = jax.jit(lambda x: second_order.gauss_newton_product(net, params, x, v, **kw))(x)
mesh = parallel.make_mesh()
sharded = jax.jit(jax.shard_map(lambda x: second_order.gauss_newton_product(net, params, x, v, axis_name="batch",
                                                                           **kw),
                                mesh=mesh, in_specs=P("batch"), out_specs=P(), check_vma=False))(x)
a, b = ravel_pytree(one)[0], ravel_pytree(sharded)[0]
jv = lambda x: jax.jvp(lambda p: net.apply(p, x, grad="tangent"), (params,), (v,))[1]  # forward mode, tangent rules
jv_one = jax.jit(jv)(x)
jv_sharded = jax.jit(jax.shard_map(jv, mesh=mesh, in_specs=P("batch"), out_specs=P("batch"), check_vma=False))(x)
print(json.dumps({"devices": mesh.size, "rel": float(jnp.abs(a - b).max() / jnp.abs(a).max()),
                  "jv_rel": float(jnp.abs(jv_one - jv_sharded).max() / jnp.abs(jv_one).max())}))
"""


def test_gauss_newton_product_split_across_devices_equals_one_device():
    """With axis_name, each of 4 devices takes 3 of 12 examples and the segment sums are psum-ed: the same G v.
    And jax.jvp through a grad="tangent" network runs inside shard_map."""
    import json
    import subprocess
    import sys

    from tests.test_parallel import env_with_devices

    out = subprocess.run([sys.executable, "-c", PSUM_SCRIPT], env=env_with_devices(4), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4 and result["rel"] < 1e-5 and result["jv_rel"] < 1e-6, result
