"""The suite's own XLA settings (tests/conftest.py): the faster code generator where this XLA knows the flag, and
a flag it does not know detected in a child instead of aborting the suite."""

import os

from tests import conftest


def test_an_unknown_xla_flag_is_detected_and_a_known_one_is_in_effect():
    assert not conftest._xla_knows("--xla_cpu_no_such_flag_for_jaxcnn=true")
    flags = os.environ["XLA_FLAGS"].split()
    if "--xla_backend_optimization_level=0" in flags:  # the flags are conftest's (not the caller's own XLA_FLAGS)
        assert (conftest.FAST_COMPILE in flags) == conftest._xla_knows(conftest.FAST_COMPILE)
