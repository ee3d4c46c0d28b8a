import os
import shutil
import subprocess
import sys
import tempfile

# Tests compile far more than they compute (small shapes, many of them): XLA's CPU backend optimisations halve
# compile time when switched off, and so does XLA's older code generator for fused elementwise ops against its MLIR
# fusion emitters (together: the suite 700 -> 500 s on a 2-core Zen 1; compiling is three quarters of its time).
# Level 0 is the tests' setting, never a user's, and not exact: XLA miscomputes a few programs there,
# deterministically (the batch-norm network of tests/_devices.py: a jitted autodiff gradient, and with the older
# emitters a one-device training step, 36-99% off in the first layers, where the default level is right; so that
# test runs at the default level). Such a slip shows as a failing test: two different programs would have to be
# miscomputed alike to hide one.
# On GPUs the tests that ask for bit-identical runs need deterministic kernels (as `jaxcnn train` asks for; see
# cli.deterministic_gpu_kernels). Set before jax is imported, in the process that starts pytest (its workers and
# the tests' subprocesses inherit it).
FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false"


def _xla_knows(flags: str) -> bool:
    """Whether this XLA starts with ``flags``: it aborts the process on a flag it does not know (one a later
    version may drop), so it is tried in a child first."""
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                           env={**os.environ, "XLA_FLAGS": flags}, timeout=120, check=False)
    return probe.returncode == 0


if "XLA_FLAGS" not in os.environ:
    flags = "--xla_backend_optimization_level=0 --xla_gpu_deterministic_ops=true"
    os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE}" if _xla_knows(f"{flags} {FAST_COMPILE}") else flags

# The session's caches live in one temporary folder, made by the process that starts pytest (the pytest-xdist
# workers and the tests' subprocesses inherit the variables) and removed by it at the end (``pytest_unconfigure``):
# each run used to leave two folders per process behind, one of them 30 MB.
OWN_CACHES = None
if "JAXCNN_TEST_CACHES" not in os.environ:
    OWN_CACHES = os.environ["JAXCNN_TEST_CACHES"] = tempfile.mkdtemp(prefix="jaxcnn-test-")
# rule="auto" caches its timings per machine (jaxcnn.autotune); the tests keep theirs apart from the user's, and
# each test starts from an empty cache (``fresh_rule_cache``), so no timing one test stored decides another's rules.
os.environ.setdefault("JAXCNN_CACHE_DIR", os.path.join(os.environ["JAXCNN_TEST_CACHES"], "rules"))
# Many tests compile the same programs, above all the training runs that the resume, extension and CLI tests start
# again in subprocesses: one XLA compilation cache for the session, shared by the pytest-xdist workers and those
# subprocesses (set here in the controller, before the workers start; 16% less time on those files).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["JAXCNN_TEST_CACHES"], "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.05")

import jax  # noqa: E402  (after the variables above, which jax and the workers read at their start)
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# float64 tests need x64; every test passes its dtype explicitly.
jax.config.update("jax_enable_x64", True)
# On GPUs XLA's default precision runs float32 products and convolutions in TF32 (10-bit significand): two correct
# formulas then differ by ~1e-3, far above the 1e-5 the float32 tests hold them to. The tests check formulas,
# so they ask for full float32 products; the CPU computes those anyway.
if jax.default_backend() != "cpu":
    jax.config.update("jax_default_matmul_precision", "highest")

# "ci" (default) is deterministic and small enough for a 2-core machine; "thorough" is for local hunting:
#   HYPOTHESIS_PROFILE=thorough pytest tests/ops
settings.register_profile(
    "ci", max_examples=8, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=300, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def fresh_rule_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JAXCNN_CACHE_DIR", str(tmp_path_factory.mktemp("rule-cache")))


def pytest_unconfigure(config):
    if OWN_CACHES:
        shutil.rmtree(OWN_CACHES, ignore_errors=True)


def pytest_sessionfinish(session):
    """On a pytest-xdist worker: hand its geometry counts to the controller (``pytest_testnodedown``)."""
    from tests.helpers import GEOMETRY_COUNTS

    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["geometry"] = [[*key, n] for key, n in GEOMETRY_COUNTS.items()]


@pytest.hookimpl(optionalhook=True)  # an xdist hook: absent without it
def pytest_testnodedown(node):
    """On the pytest-xdist controller: add up the workers' geometry counts."""
    from tests.helpers import GEOMETRY_COUNTS

    for family, cls, n in getattr(node, "workeroutput", {}).get("geometry", []):
        GEOMETRY_COUNTS[family, cls] += n


def pytest_terminal_summary(terminalreporter):
    """How many examples of each geometry class the property tests drew (tests/ops/test_geometry.py)."""
    from tests.helpers import GEOMETRY_COUNTS

    if GEOMETRY_COUNTS:
        families = sorted({family for family, _ in GEOMETRY_COUNTS})
        lines = [f"{family}: " + ", ".join(f"{c} {n}" for (f, c), n in sorted(GEOMETRY_COUNTS.items()) if f == family)
                 for family in families]
        terminalreporter.write_line("geometry classes drawn (examples; one may fall in several): " + "; ".join(lines))
