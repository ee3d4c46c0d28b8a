"""The command-line tool re-executes itself under tcmalloc where it is installed (jaxcnn._malloc)."""

import os
import subprocess
import sys

import pytest

from jaxcnn import _malloc


def test_when_the_tool_re_executes_itself():
    lib = "libtcmalloc_minimal.so.4"
    env = _malloc.preload_env({"PATH": "/bin", "LD_PRELOAD": "libother.so"}, lib, platform="linux")
    assert env == {"PATH": "/bin", "LD_PRELOAD": f"{lib}:libother.so"}
    assert _malloc.preload_env({}, lib, platform="linux") == {"LD_PRELOAD": lib}
    assert _malloc.preload_env(env, lib, platform="linux") is None  # preloaded: no second re-execution
    assert _malloc.preload_env({"JAXCNN_MALLOC": "system"}, lib, platform="linux") is None
    assert _malloc.preload_env({}, None, platform="linux") is None  # not installed
    assert _malloc.preload_env({}, lib, platform="darwin") is None


@pytest.mark.skipif(_malloc.tcmalloc() is None or sys.platform != "linux", reason="tcmalloc is not installed")
def test_a_process_runs_under_tcmalloc_once_re_executed_and_under_glibc_when_asked():
    code = "from jaxcnn import _malloc; _malloc.reexec_under_tcmalloc(); print(_malloc.allocator())"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "JAXCNN_MALLOC")}
    run = lambda extra: subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True,
                                       text=True, check=True).stdout.split()
    assert run({}) == ["tcmalloc"]  # printed once: the first image was replaced before printing
    assert run({"JAXCNN_MALLOC": "system"}) == ["system"]
