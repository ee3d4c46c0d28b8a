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
}


# Left to `pytest -m slow` (about 80 test-seconds, to keep the default suite under 10 minutes on a 2-core machine):
# the experiments whose subject the default suite tests on its own (test_bench's bench command, test_mixed_precision,
# test_precision's CLI run, the flag test below, test_second_order's Gauss-Newton products, test_newton's runs).
COVERED_ELSEWHERE = {"benchmark", "mixed_precision", "precision", "xla_flags", "gauss_newton_cost",
                     "newton_sensitivity"}


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
