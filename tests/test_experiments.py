"""Each experiment script runs end to end (in its --quick form) and writes its report."""

import importlib
import os

import pytest

EXPERIMENTS = {
    "gradient_agreement": ["gradient_agreement.md"],
    "training_curves": ["training_curves.md", "training_curves.png"],
    "conv_complexity": ["conv_complexity.md", "conv_complexity.png"],
    "vanishing_gradients": ["vanishing_gradients.md", "vanishing_gradients.png"],
    "scaling": ["scaling.md"],
    "benchmark": [],  # results_name(): one file per backend
    "newton_sensitivity": ["newton_sensitivity.md", "newton_sensitivity.png"],
    "gauss_newton_cost": ["gauss_newton_cost.md"],
    "newton_mnist": ["newton_mnist.md", "newton_mnist.png"],
    "mixed_precision": ["mixed_precision.md"],
    "precision": ["precision.md", "precision.png", "precision_presets.md"],
    "xla_flags": ["xla_flags.md"],
    "pallas_block": [],  # results_name(): one file per backend
    "targets": [],  # results_name(): one file per backend
}


# Left to `pytest -m slow` (about 80 test-seconds, to keep the default suite under 10 minutes on a 2-core machine):
# the experiments whose subject the default suite tests on its own (test_bench's bench command, test_mixed_precision,
# test_precision's CLI run, the flag test below, test_second_order's Gauss-Newton products, test_newton's runs,
# the goals test below with test_bench's, the Pallas kernel's test below).
COVERED_ELSEWHERE = {"benchmark", "mixed_precision", "precision", "xla_flags", "gauss_newton_cost",
                     "newton_sensitivity", "targets", "pallas_block"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in COVERED_ELSEWHERE else name
                                  for name in EXPERIMENTS])
def test_experiment_runs_quick(name, tmp_path):
    import sklearn  # noqa: F401  (its first import in a process sets KMP_* variables: not the experiment's doing)

    environment = dict(os.environ)
    module = importlib.import_module(f"experiments.{name}")
    module.main(["--quick", "--out", str(tmp_path)])
    assert dict(os.environ) == environment, "an experiment changed the environment later subprocesses inherit"
    files = EXPERIMENTS[name] or [module.results_name()]
    for file in files:
        assert (tmp_path / file).stat().st_size > 0, f"{name} did not write {file}"
    report = (tmp_path / files[0]).read_text()
    assert "| " in report and "cores" in report, "a report has its table and the machine it ran on"


def test_a_flag_xla_does_not_know_is_reported_not_fatal():
    from experiments import xla_flags

    why = xla_flags.run_child("--xla_no_such_flag_in_any_version=1", "digits-cnn", 16, 1)
    assert isinstance(why, str) and "xla_no_such_flag_in_any_version" in why, why


def test_the_goals_table_reads_each_goal_off_the_measurements():
    """experiments.targets: each goal of the performance issue is a ratio of medians of the right two rows, met or
    not against its target, "-" where a baseline is missing; the memory goal covers the rules auto can pick."""
    from experiments import targets
    from jaxcnn.bench import Measurement

    def result(preset, batch, ms, ceiling):  # ms: name -> (median, min)
        rows = [Measurement(name, median, minimum, median) for name, (median, minimum) in ms.items()]
        return {"preset": preset, "batch": batch, "dtype": "float32", "measurements": rows, "flops": 25e9,
                "bytes": 1e9, "ceiling": ceiling, "bandwidth": 1000.0}

    memory = [("fused, flip", 3.0), ("fused, im2col", 20.0), ("fused, winograd in blocks", 7.0),
              ("xla autodiff chain", 10.0)]
    auto = "hand auto: fused, winograd"
    cpu_times = {auto: (400.0, 380.0), "hand flip": (390.0, 370.0), "pytorch channels_last": (380.0, 375.0)}
    cpu = targets.goals([result("simplenn-cifar", 128, cpu_times, 100.0)], memory, "cpu")
    assert [row[-1] for row in cpu] == ["yes", "no", "yes", "yes", "no"], cpu
    assert cpu[0][2].startswith("1.03x") and "best: hand flip" in cpu[0][2]  # 400 / 390
    assert cpu[1][2].startswith("1.03x")  # the best hand variant, 390 / 380
    assert cpu[2][2].startswith("62%")  # 25 GFLOP in 0.4 s against 100 GFLOP/s
    assert [row[1] for row in cpu[3:]] == ["fused, flip", "fused, winograd in blocks"]  # "fused, im2col": no candidate
    gpu_times = {auto: (2.0, 1.9), "xla autodiff": (3.0, 2.9), "pytorch channels_last, compiled": (2.5, 2.4)}
    gpu = targets.goals([result("simplenn-cifar", 512, gpu_times, 1e5)], memory, "gpu")
    assert [row[-1] for row in gpu[:4]] == ["yes", "-", "no", "yes"], gpu
    assert gpu[0][2].startswith("0.67x") and gpu[2][2].startswith("0.80x")
    assert gpu[3][2].startswith("2.0x of 1.00 ms")  # the roofline: 1 GB at 1000 GB/s (25 GFLOP take 0.25 ms)


def test_the_pallas_kernel_is_the_library_glue_and_lowers_for_cuda():
    """experiments.pallas_block: in Pallas's interpreter the kernel gives the library's Delta_S and db (eq. 24, 26,
    14), and the block's backward with it the library's (dx, dw, db), in float64, on a conv output the windows do
    not tile (7x7: its last row and column get no gradient) and on windows of equal entries (the first maximum
    takes the gradient); it refuses channels Triton cannot block, and lowers to Triton for CUDA."""
    import jax
    import jax.numpy as jnp

    from experiments import pallas_block
    from jaxcnn.ops import block
    from jaxcnn.ops.pool import max_with_index

    glue_gap, backward_gap = pallas_block.agreement((7, 7, 3), 8, 3, 2, jnp.float64, interpret=True)
    assert glue_gap < 1e-13 and backward_gap < 1e-13, (glue_gap, backward_gap)
    _, (delta, z_next, index, pool, out_hw) = pallas_block.case((7, 7, 3), 8, 3, 2, jnp.float64, jax.random.key(1))
    full, db = pallas_block.masked_route(delta, z_next, index, pool, out_hw, interpret=True)
    assert full.shape == (2, 7, 7, 8) and not full[:, 6].any() and not full[:, :, 6].any() and db.shape == (8,)

    z_next, index = max_with_index(block.pool_geometry("test", 2), jnp.ones((1, 4, 4, 8)))  # every window tied
    ours = pallas_block.masked_route(delta[:1, :2, :2], z_next, index, pool, (4, 4), interpret=True)
    theirs = pallas_block.library_glue(delta[:1, :2, :2], z_next, index, pool, (4, 4))
    assert all(bool((a == b).all()) for a, b in zip(ours, theirs)) and bool((ours[0][:, ::2, ::2] != 0).all())
    with pytest.raises(ValueError, match="channels C must be a power of two"):
        pallas_block.masked_route(delta[..., :6], z_next[..., :6], index[..., :6], pool, out_hw, interpret=True)
    assert pallas_block.lowers_for_cuda() == "yes"
    row = pallas_block.timings_table(True, (2,), (jnp.float32,), interpret=True).splitlines()[-1].split(" | ")
    assert len(row) == 10 and all(float(ms) > 0 for ms in row[3:8]), row  # the GPU's table, interpreted
