"""The command-line tool runs under tcmalloc where it is installed (``apt-get install libtcmalloc-minimal4``).

XLA's CPU runtime allocates a step's temporary arrays anew at every step and frees them after it. glibc's malloc
serves every block over 32 MiB (its largest mmap threshold) by a fresh ``mmap`` and returns it by ``munmap``, so
each step faults in and zeroes those pages again: on the 2-core VM of BENCHMARKS.md building one 144 MiB
phi(pad(Z)) took 124 ms under glibc and 29 ms under tcmalloc, which keeps freed memory for the next request, and
a whole training step 1.2-1.7x less time (simplenn-mnist and simplenn-cifar, batch 128; PyTorch's step gains
as much on MNIST), and an epoch of ``jaxcnn train`` on MNIST 1.31x, with the same numbers. glibc's own knobs
(``mallopt`` with mmap disabled, ``glibc.malloc.hugetlb``) did not help measurably.

An allocator is chosen when a process starts, so ``jaxcnn``'s entry point re-executes itself once with tcmalloc
in ``LD_PRELOAD`` (same process id, arguments and environment otherwise). ``JAXCNN_MALLOC=system`` keeps glibc's
malloc. Library use (``import jaxcnn``) is never affected: a program of your own can be started under
``LD_PRELOAD=libtcmalloc_minimal.so.4`` the same way.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

ENV = "JAXCNN_MALLOC"


def tcmalloc() -> str | None:
    """tcmalloc's shared library as the dynamic loader finds it, or None where it is not installed."""
    for name in ("tcmalloc_minimal", "tcmalloc"):
        if library := ctypes.util.find_library(name):
            return library
    return None


def preload_env(environ: dict, library: str | None, platform: str = sys.platform) -> dict | None:
    """The environment to re-execute with, tcmalloc first in ``LD_PRELOAD``; None to run as is: no library, not
    Linux, ``JAXCNN_MALLOC=system``, or tcmalloc preloaded already (which also ends the one re-execution)."""
    if library is None or platform != "linux" or environ.get(ENV) == "system" or \
            "tcmalloc" in environ.get("LD_PRELOAD", ""):
        return None
    return {**environ, "LD_PRELOAD": ":".join(filter(None, (library, environ.get("LD_PRELOAD"))))}


def reexec_under_tcmalloc() -> None:
    """Replace this process by itself under tcmalloc, if ``preload_env`` says so (returns otherwise)."""
    env = preload_env(dict(os.environ), tcmalloc())
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)


def allocator() -> str:
    """The allocator this process runs with: "tcmalloc" when its library is mapped, else "system"."""
    try:
        return "tcmalloc" if "tcmalloc" in Path("/proc/self/maps").read_text() else "system"
    except OSError:
        return "system"
