"""The benchmark's pieces: the FLOP count of the notes, the XLA and Flax baselines computing the same network,
and the command (PyTorch is not installed in CI; its mirror is exercised where it is)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
from jaxcnn import autotune, bench, cli

NET = jc.Sequential([jc.Conv(4, 3, stride=(1, 2), padding=((1, 0), (2, 1))), jc.Tanh(), jc.MaxPool(2),
                     jc.ConvReLUPool(6, 3, padding=1), jc.AvgPool((2, 1)), jc.Sigmoid(), jc.Flatten(),
                     jc.Dense(5), jc.ReLU(), jc.Dense(3)])
SHAPE = (12, 16, 2)


def test_flops_of_simplenn_mnist_are_the_hand_count():
    conv1 = 2 * 128 * 32 * (5 * 5 * 1) * 28 * 28 * 2  # forward and dW: the input gradient is not needed
    conv2 = 2 * 128 * 64 * (3 * 3 * 32) * 14 * 14 * 3
    conv3 = 2 * 128 * 64 * (3 * 3 * 64) * 7 * 7 * 3
    dense = 2 * 128 * 576 * 10 * 3
    assert bench.count_flops(jc.preset("simplenn-mnist"), (28, 28, 1), 128) == conv1 + conv2 + conv3 + dense
    assert round((conv1 + conv2 + conv3 + dense) / 1e9, 2) == 4.49


def test_flops_count_the_layers_inside_residual_blocks():
    body = [jc.Conv(8, 3, stride=2, padding=1), jc.ReLU(), jc.Conv(8, 3, padding=1)]
    stem = jc.Conv(4, 3, padding=1)
    with_block = jc.Sequential([stem, jc.Residual(body), jc.GlobalAvgPool(), jc.Dense(3)])
    chain = jc.Sequential([stem, *body, jc.GlobalAvgPool(), jc.Dense(3)])
    projection = 2 * 16 * 8 * 4 * 4 * 4 * 3  # the 1x1, stride-2 shortcut: 8x8x4 -> 4x4x8, three products
    assert bench.count_flops(with_block, (8, 8, 3), 16) == bench.count_flops(chain, (8, 8, 3), 16) + projection


def test_bytes_moved_are_the_hand_count():
    net = jc.Sequential([jc.Conv(2, 3, padding=1), jc.ReLU(), jc.Flatten(), jc.Dense(3)])
    activations = 32 + 32 + 32 + 3  # conv, relu, flatten outputs (4x4x2) and the logits
    params = (3 * 3 * 1 * 2 + 2) + (32 * 3 + 3)
    assert bench.count_bytes(net, (4, 4, 1), 5) == 4 * (5 * (5 * activations + 2 * 16) + 10 * params)
    assert bench.count_bytes(net, (4, 4, 1), 5, jnp.bfloat16) == 2 * (5 * (5 * activations + 2 * 16) + 10 * params)
    body = [jc.Conv(8, 3, stride=2, padding=1), jc.ReLU(), jc.Conv(8, 3, padding=1)]
    stem = jc.Conv(4, 3, padding=1)
    with_block = jc.Sequential([stem, jc.Residual(body), jc.GlobalAvgPool(), jc.Dense(3)])
    chain = jc.Sequential([stem, *body, jc.GlobalAvgPool(), jc.Dense(3)])
    join, projection = 4 * 4 * 8, 4 * 8  # the sum's output (the body's last shape) and the 1x1 kernel
    assert bench.count_bytes(with_block, (8, 8, 3), 16) == bench.count_bytes(chain, (8, 8, 3), 16) + \
        4 * (16 * 5 * join + 10 * projection)
    assert bench.roofline_ms(2e9, 1e9, ceiling=100.0, bandwidth=10.0) == 100.0  # memory-bound: 1 GB at 10 GB/s
    assert bench.roofline_ms(2e9, 1e8, ceiling=100.0, bandwidth=10.0) == 20.0  # compute-bound
    assert bench.memory_bandwidth(megabytes=4) > 0


def test_xla_baseline_computes_our_network():
    params = NET.init(jax.random.key(0), SHAPE, dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, *SHAPE)))
    np.testing.assert_allclose(bench.xla_apply(NET, params, x), NET.apply(params, x), rtol=1e-12, atol=1e-14)


def test_xla_baseline_computes_a_residual_network_with_batch_norm_in_training_mode():
    net = jc.Sequential([jc.Conv(4, 3, padding=1, bias=False), jc.BatchNorm(), jc.ReLU(),
                         jc.Residual([jc.Conv(6, 3, stride=2, padding=1), jc.BatchNorm(), jc.ReLU()]),
                         jc.GlobalAvgPool(), jc.Dense(3)])
    params = net.init(jax.random.key(0), (10, 10, 1), dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 10, 10, 1)))
    np.testing.assert_allclose(bench.xla_apply(net, params, x), net.outputs(params, x, train=True)[-1], rtol=1e-11,
                               atol=1e-13)


def test_flax_mirror_has_our_shapes():
    if importlib.util.find_spec("flax") is None:
        pytest.skip("flax is the optional 'bench' extra")
    model = bench.flax_model(NET)
    x = jnp.zeros((2, *SHAPE), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    assert model.apply(variables, x).shape == (2, 3)
    assert sum(a.size for a in jax.tree_util.tree_leaves(variables)) == NET.num_params(SHAPE)
    resnet = jc.preset("resnet-small")
    model = bench.flax_model(resnet)
    variables = model.init(jax.random.key(0), x)
    assert sum(a.size for a in jax.tree_util.tree_leaves(variables["params"])) == resnet.num_params(SHAPE)
    assert bench.flax_loss(model, True)(variables, x, jnp.array([0, 1])).shape == ()


RESNET = jc.Sequential([jc.Conv(4, 3, padding=1, bias=False), jc.BatchNorm(), jc.LeakyReLU(0.1),
                        jc.Residual([jc.Conv(4, 3, padding=1), jc.BatchNorm(), jc.GELU()]),
                        jc.Residual([jc.Conv(6, 3, stride=2, padding=1), jc.BatchNorm(), jc.ELU(0.5)]),
                        jc.Dropout(0.0), jc.GlobalAvgPool(), jc.Dense(5), jc.BatchNorm(), jc.Tanh(), jc.Dense(3)])


@pytest.mark.parametrize("net, shape", [(NET, SHAPE), (RESNET, (9, 10, 2))], ids=["chain", "resnet"])
def test_torch_mirror_is_our_network_with_our_gradients(net, shape):
    """The PyTorch baseline computes the same function with the same parameter gradients (training mode), in
    float64 (dropout, left out of the mirror, at rate 0)."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (not a dependency)")
    import torch

    from jaxcnn import torch_mirror

    params = net.init(jax.random.key(1), shape, dtype=jnp.float64)
    x = np.random.default_rng(0).normal(size=(4, *shape))
    y = np.array([0, 2, 1, 2])
    loss = lambda p: -jnp.mean(jax.nn.log_softmax(net.forward(p, x, train=True)[0][-1])[np.arange(4), y])
    value, grads = jax.value_and_grad(loss)(params)
    model = torch_mirror.module(net, shape, params).to(torch.float64)
    out = torch.nn.functional.cross_entropy(model(torch.from_numpy(x.transpose(0, 3, 1, 2))), torch.from_numpy(y))
    out.backward()
    np.testing.assert_allclose(out.item(), value, rtol=1e-12)
    twin = torch_mirror.module(net, shape, grads)  # our gradients, laid out as PyTorch's parameters
    for (name, p), (_, g) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        np.testing.assert_allclose(p.grad.numpy(), g.detach().numpy(), rtol=1e-9, atol=1e-12, err_msg=name)
    step = bench.torch_step(net, shape, 4, channels_last=True)
    step()
    assert "torch" in step.note


def test_bench_command_times_every_variant(monkeypatch, capsys):
    """`jaxcnn bench` times every variant, the baselines of other libraries included: stand-ins for PyTorch's steps
    here (not installed in CI), whose rows must appear (they were once dropped without a word)."""
    def stand_in(net, input_shape, batch, channels_last, dtype, compiled):
        def step():  # as torch.compile does, it leaves a variable in the environment
            os.environ["JAXCNN_TEST_STAND_IN"] = "1"
        step.note = "stand-in"
        return step

    results = []
    run, candidates = bench.run, autotune.candidates
    monkeypatch.setattr(bench, "torch_step", stand_in)
    # rule="auto"'s row with two candidates to time (tests/test_autotune.py times them all)
    monkeypatch.setattr(autotune, "candidates", lambda net: candidates(net)[:2])
    monkeypatch.setattr(bench, "run", lambda *args, **kwargs: results.append(run(*args, **kwargs)) or results[-1])
    probe_calls, matmul_probe = [], bench.matmul_probe

    def counted_probe(*args):  # the matmul ceiling is timed in the steps' rounds: a warm-up, then once per round
        probe, flops = matmul_probe(*args)
        return (lambda: probe_calls.append(probe())), flops

    monkeypatch.setattr(bench, "matmul_probe", counted_probe)
    assert cli.main(["bench", "--preset", "digits-cnn", "--batch-size", "8", "--steps", "2", "--profile"]) == 0
    assert len(probe_calls) == 1 + 2
    assert "JAXCNN_TEST_STAND_IN" not in os.environ  # the environment later subprocesses inherit is restored
    [result] = results
    names = [m.name for m in result["measurements"]]
    assert {"hand im2col", "hand flip", "hand fused", "hand winograd", "autodiff", "xla autodiff", "pytorch",
            "pytorch channels_last", "pytorch channels_last, compiled"} <= set(names)
    chosen = [name.removeprefix("hand auto: ") for name in names if name.startswith("hand auto: ")]
    assert chosen and chosen[0] in [autotune.label(*c) for c in candidates(jc.preset("digits-cnn"))[:2]]
    assert ("flax" in names) == (importlib.util.find_spec("flax") is not None)
    assert all(m.median_ms > 0 and m.min_ms <= m.median_ms <= m.max_ms for m in result["measurements"])
    assert all(m.compile_s > 0 and m.temp_mb is not None for m in result["measurements"]
               if not m.name.startswith(("flax", "pytorch")))
    out = capsys.readouterr().out
    assert "GB moved per step (counted by hand)" in out and "roofline" in out and "x roofline" in out
    assert f"matmul ceiling {result['ceiling']:.0f} GFLOP/s" in out and "timed in the same rounds" in out
    assert result["ceiling"] > 0 and result["bandwidth"] > 0
    assert "| hand im2col |" in out and "| xla autodiff |" in out and "| 1.00x |" in out and "| pytorch |" in out
    # --profile: the step rule="auto" chose against XLA autodiff, by op and by layer
    assert f"| hand auto: {chosen[0]}: op | ms | xla autodiff: op | ms |" in out
    assert f"| layer | hand auto: {chosen[0]}: forward ms | backward ms |" in out and "\n| conv1 | " in out


def test_given_variants_with_the_baselines_beside_them(monkeypatch):
    """bench.run(variants=..., baselines=True), as experiments.targets runs it on a GPU: the given variants, the
    step rule="auto" chose and Flax's, no other variant of ours."""
    candidates = autotune.candidates
    monkeypatch.setattr(autotune, "candidates", lambda net: candidates(net)[:1])  # one to time: the test is the rows
    net = jc.preset("digits-cnn")
    given = {"xla autodiff": bench.jax_variants(net)["xla autodiff"]}
    result = bench.run("digits-cnn", (8, 8, 1), 4, steps=1, torch=False, variants=given, baselines=True,
                       matmul_n=64, bandwidth_mb=1)
    names = [m.name for m in result["measurements"]]
    assert names[0] == "xla autodiff" and names[1].startswith("hand auto: ")
    assert names[2:] == (["flax"] if importlib.util.find_spec("flax") else []), names


def test_block_memory_rows():
    rows = dict(bench.block_memory(batch=4, shape=(6, 6, 3), features=4))
    assert set(rows) == {"fused, flip", "fused, im2col", "fused, im2col, phi stored", "fused, im2col, phi in blocks",
                         "fused, winograd", "fused, winograd in blocks", "xla autodiff chain"}
    assert all(v > 0 for v in rows.values())


def test_pool_times_rows():
    [(shape, *times)] = bench.pool_times(batch=2, shapes=((4, 6, 3),))
    assert shape == (4, 6, 3) and len(times) == 3 and all(t > 0 for t in times)


def test_profile_groups_ops_by_their_jax_origin():
    params = NET.init(jax.random.key(0), SHAPE)
    x = jnp.ones((4, *SHAPE), jnp.float32)
    y = jnp.zeros(4, jnp.int32)
    step = bench.JaxStep(lambda p, x, y: jnp.mean(NET.apply(p, x, rule="im2col") ** 2), params, x, y)
    rows = bench.profile(step, steps=2)
    groups = {group for group, _, _ in rows}
    assert "backward dot_general" in groups and any(g.startswith("forward ") for g in groups), groups
    assert not any("params" in g for g in groups), groups  # parameters name no operation
    assert all(ms >= 0 and n >= 1 for _, ms, n in rows) and sum(ms for _, ms, _ in rows) > 0


def test_profile_by_layer_names_every_layer_of_both_steps_nested_ones_included():
    """Each layer runs in its scope (``Sequential.scopes``), in our network and in the XLA baseline alike, so that
    the profile by layer attributes the backward pass of a residual block's layers to them, not to the block."""
    net = jc.Sequential([jc.Conv(4, 3, padding=1), jc.ReLU(), jc.Residual([jc.Conv(4, 3, padding=1), jc.ReLU(),
                                                                        jc.Conv(4, 3, padding=1)]),
                         jc.GlobalAvgPool(), jc.Dense(3)])
    assert net.scopes == ("0:conv1", "1:relu", "2:res1", "3:global_avg_pool", "4:dense1")
    params = net.init(jax.random.key(0), (6, 6, 2))
    x, y = jnp.ones((2, 6, 6, 2), jnp.float32), jnp.zeros(2, jnp.int32)
    variants = bench.jax_variants(net)
    for name in ("hand im2col", "xla autodiff"):
        hlo = jax.jit(jax.grad(variants[name])).lower(params, x, y).compile().as_text()
        labels = set(bench._op_origins(hlo, "layer").values())
        assert {"0:conv1 forward", "0:conv1 backward", "2:res1/0:conv1 backward", "2:res1/2:conv2 backward",
                "4:dense1 backward"} <= labels, (name, labels)
        assert not any(label.startswith("2:res1 ") and "backward" in label and "conv" in label for label in labels)


def test_layer_table_lines_up_a_fused_network_with_its_separate_layers():
    """Rows are layers with parameters with the parameter-free layers after them, named without their indices, so
    that a fused block (hand: conv2 = conv, ReLU, pooling) and the layers it replaces (xla: 2-4) share a row."""
    hand = [("4:dense1 forward", 1.0, 1), ("3:res1/0:conv1 backward", 2.0, 1), ("update", 0.5, 3),
            ("xla copy", 0.25, 1), ("loss forward", 0.1, 1), ("3:res1 backward", 0.3, 1), ("0:conv1 forward", 4.0, 2),
            ("1:relu forward", 0.5, 1), ("2:conv2 forward", 3.0, 1), ("3:res1/1:relu backward", 0.25, 1)]
    xla = [("0:conv1 forward", 3.0, 1), ("1:relu forward", 1.0, 1), ("2:conv2 forward", 2.0, 1),
           ("3:relu forward", 0.5, 1), ("4:max_pool forward", 0.75, 1), ("5:res1/0:conv1 backward", 1.5, 1),
           ("6:dense1 forward", 2.0, 1), ("xla copy", 1.0, 1), ("xla iota", 1.0, 1)]
    lines = bench._layer_table({"hand": hand, "xla": xla}).splitlines()
    cells = {c[0]: c[1:] for c in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert list(cells) == ["conv1", "conv2", "res1", "res1/conv1", "dense1", "loss", "ops XLA added (no origin)",
                           "update (optimizer)", "all ops"]
    assert cells["conv1"] == ["4.5", "", "4.0", ""] and cells["conv2"] == ["3.0", "", "3.2", ""]
    assert cells["res1/conv1"] == ["", "2.2", "", "1.5"]
    assert cells["ops XLA added (no origin)"] == ["0.2", "", "2.0", ""]
    assert cells["all ops"][0] == "11.9" and cells["all ops"][2] == "12.8"
