"""``rule="auto"``: the convolutions' hand rule chosen by timing the candidates on this machine, as cuDNN's
benchmark mode does, and kept in an on-disk cache.

Which rule is fastest depends on the machine, not on the math: the im2col products (Lin eq. 12, 14, 18, with
phi(pad(Z)) stored in the forward pass or built a block of examples at a time in both: ``block``) or Ray's flip rule
(XLA's convolutions), and where the network has 3x3, stride-1 layers Winograd's F(2x2, 3x3) for those (the others
taking the backend's default), for the whole batch or a block of examples at a time: fewer products
(``jaxcnn.ops.winograd``); in blocks, the others' phi(pad(Z)) is built in blocks too, or stored (``OTHERS_STORED``).
phi(pad(Z)) rebuilt for the whole batch in the backward pass is not a candidate: it was slower than storing it in
every table of BENCHMARKS.md (CPU and GPU), and slower and heavier than blocks. On one 2-core CPU im2col wins by 2x,
on another 2-core CPU with a 6x faster matrix unit flip wins by 15%, and on GPUs flip wins (BENCHMARKS.md). So
``tune`` times one jitted gradient of the network's objective (forward and backward of every layer: what a training
step computes) at the run's input shape, batch and dtype with each candidate given to every conv layer that names no
rule of its own, on the network as given and on its fused form (Lin's Conv-ReLU-pool block, eq. 24-28: the same
function and params), and keeps the fastest, or, among the candidates within ``TIE`` (5%) of it by both the minimum
and the median of the timings (the noise of a timing, and the tolerance of the performance issue's speed goal), the
one whose compiled gradient needs the least temporary memory (phi(pad(Z)) stored and Winograd's transformed tiles
for the whole batch need 2-3x what blocks of either need). So a heavy candidate is chosen only where it is more than
5% faster than every lighter one. A limit on that memory (``max_temp_mb``; ``TrainConfig.rule_memory_mb``,
``--rule-memory-mb``), as cuDNN's workspace limit, passes over the candidates that need more.

The whole network is timed, not each layer alone: a layer's rule changes what XLA fuses around it, and on the
machine of BENCHMARKS.md the per-layer winners, timed one layer at a time, made the network slower than every
uniform rule (simplenn-mnist, batch 128: 112.8 ms a step against 88.0-104.2 ms).

Timing happens before anything is traced, from the shapes alone; the winner for each network geometry is stored
under the machine's key (CPU model, family and model numbers and vector extensions, or GPU name; JAX version)
in ``cache_file()``, so that later runs on the same machine reuse it without timing. Timing is noisy: two
machines, or two fresh timings on a busy machine, can choose differently, so a run records the rules it used (its
network config), and ``--resume`` reuses them.

It is the trainer's default (``TrainConfig.rule = "auto"``). A step under ``MIN_FLOPS`` that the cache does not
hold is not timed (compiling six to twelve candidates would cost more than such a run could gain): it takes the
backend's default, written into the layers like a timed choice.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn import bench
from jaxcnn import network as nw
from jaxcnn._io import atomic_write, strict_json
from jaxcnn.ops import conv

# (rule, store_phi, block): phi(pad(Z)) stored, built block by block; XLA's convolutions
RULES = (("im2col", True, None), ("im2col", False, "auto"), ("flip", False, None))
# F(2x2, 3x3) for the open 3x3, stride-1 layers, for the whole batch at once or a block of examples at a time; the
# other layers take the backend's default (``uniform``)
WINOGRAD = (("winograd", False, None), ("winograd", False, "auto"))
# ... in blocks, with phi(pad(Z)) stored for the other layers, where the backend's default is im2col and the network
# has such layers: in blocks a first 5x5 layer over 3 channels stacks its S into a zero-filled buffer, and stored
# it ran 1.2-1.3x faster (simplenn-cifar's step 0.93-0.96x, for 38 MB more; chosen in one of four tunings, by 13%;
# BENCHMARKS.md)
OTHERS_STORED = ("winograd", True, "auto")
# Candidates this much slower than the fastest by the minimum and by the median of their timings count as tied with
# it, and the lightest of those is chosen. 5%: the performance issue's tolerance for the default against the best
# rule, and about the noise of 7 rounds on a shared 2-core VM (Winograd for the whole batch and in blocks read 0-6%
# apart either way). At 3% Winograd for the whole batch (2-3x the temporaries of blocks) won two of four tunings
# by 3.3-3.4% (BENCHMARKS.md). Both measures: on resnet-small the minima of phi stored and in blocks were 0.2%
# apart, the medians 11% (30 rounds: 4% and 11%).
TIE = 0.05
TIMINGS = 7  # round-robin timings of each candidate; their minimum chooses, their median confirms a tie
# Candidates within CLOSE of the fastest by the minimum after those rounds are timed RETIMINGS more times, round-robin
# among themselves, before the choice: a median of 7 rounds on a busy 2-core VM moved by up to 13% between tunings
# and decided ties by noise (BENCHMARKS.md).
CLOSE, RETIMINGS = 0.15, 14
# A training step below this many FLOPs (bench.count_flops) is not timed by the trainer's rule="auto": its layers
# are small, a step takes milliseconds, and timing the candidates (compiling each) would cost more than the run
# could gain; it takes the backend's default. `jaxcnn bench --tune` times it all the same.
MIN_FLOPS = 1e9
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "asimd", "sve")


def label(rule: str, store_phi: bool | None, block=None, fused: bool = False) -> str:
    """A candidate's name in logs, the cache and ``summary.json``: ``im2col (phi stored)``, ``im2col``,
    ``im2col (phi in blocks)``, ``flip``, ``winograd``, ``winograd (in blocks)``, ``winograd (in blocks), others phi
    stored``, each with ``fused, `` in front for the network with Lin's fused blocks."""
    if rule == "winograd":  # store_phi: that of the layers it does not compute (``OTHERS_STORED``)
        name = f"winograd{'' if block is None else ' (in blocks)'}{', others phi stored' if store_phi else ''}"
    else:
        name = f"{rule}{' (phi stored)' if store_phi else ''}{'' if block is None else ' (phi in blocks)'}"
    return f"{'fused, ' if fused else ''}{name}"


def candidates(net: nw.Sequential) -> list[tuple[str, bool, str | None, bool]]:
    """(rule, store_phi, block, fused) to time: each rule (Winograd's where an open layer is 3x3 with stride 1, and
    ``OTHERS_STORED`` where other open layers build phi(pad(Z))), on the network as given and, where it has Conv ->
    ReLU -> MaxPool runs, on its fused form (``Sequential.fuse``: the same function and params)."""
    rules = RULES
    if net.with_convs(_winograd, rule="winograd") != net:
        others = net.with_convs(lambda layer: _open(layer) and not layer.winograd_applies(), rule="flip") != net
        stored = others and conv.resolve("rule auto", None, None)[0] == "im2col"
        rules += WINOGRAD + ((OTHERS_STORED,) if stored else ())
    return [(*rule, fused) for fused in ((False, True) if net.fuse() != net else (False,)) for rule in rules]


def _winograd(layer: nw.Conv) -> bool:
    """An open conv layer that Winograd's F(2x2, 3x3) computes."""
    return _open(layer) and layer.winograd_applies()


def machine_key() -> str:
    """What the timings depend on: the CPU model and its vector extensions, or the accelerator; JAX's version."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return f"{device.platform} {device.device_kind}; jax {jax.__version__}"
    model, isa = cpu()
    return f"cpu {model} [{isa}]; {os.cpu_count()} cores; jax {jax.__version__}"


def cpu(cpuinfo: str | None = None) -> tuple[str, str]:
    """This CPU's model and the vector extensions of ``ISA_FLAGS`` it has, from ``cpuinfo`` (the text of
    /proc/cpuinfo, read when None; "" unknown). The model is its name with its family and model numbers where
    /proc/cpuinfo gives them: a VM may name a Zen 3 and a Zen 4 both "AMD EPYC" (family 25, models 1 and 17),
    and the faster rule differs between them (BENCHMARKS.md)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():  # the first processor's fields
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or platform.processor() or platform.machine()
    if fields.get("cpu family") and fields.get("model"):
        model = f"{model} (family {fields['cpu family']}, model {fields['model']})"
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return model, " ".join(f for f in ISA_FLAGS if f in flags)


def cache_file() -> Path:
    """``$JAXCNN_CACHE_DIR/rules.json``, else ``$XDG_CACHE_HOME/jaxcnn/rules.json`` (``~/.cache/jaxcnn``)."""
    base = os.environ.get("JAXCNN_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") \
        / "jaxcnn"
    return Path(base) / "rules.json"


def _read(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measure anew (it is only a cache)
    return cache if isinstance(cache, dict) else {}


def _complete(entry, net: nw.Sequential) -> bool:
    """Whether a cache entry holds, for every candidate, positive times (minimum and median) and a temporary memory
    (a size, or None where the backend reports none), or why it was skipped, with at least one candidate timed;
    else it is measured anew."""
    def number(v, least):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= least

    def timed(t):
        return number(t.get("ms"), 1e-9) and number(t.get("median_ms"), 1e-9) and "temp_mb" in t and \
            (t["temp_mb"] is None or number(t["temp_mb"], 0))

    timings = [entry.get(label(*c)) if isinstance(entry, dict) else None for c in candidates(net)]
    return all(isinstance(t, dict) and (timed(t) or isinstance(t.get("skipped"), str)) for t in timings) and \
        any(timed(t) for t in timings)


def geometry_key(net: nw.Sequential, input_shape: tuple, batch: int, dtype) -> str:
    """One network geometry: its layers and settings (rules of layers that name one included, other rules and
    initialisers left out), the input shape, batch and dtype."""
    layers = [{k: v for k, v in layer.items() if k not in ("init", "grad")} for layer in net.to_config()["layers"]]
    # 3: candidates without phi recomputed, temporary memory kept (2: residual bodies timed too; 1: top level only)
    return json.dumps([3, layers, list(input_shape), batch, jnp.dtype(dtype).name], default=str)


def uniform(net: nw.Sequential, rule: str, store_phi: bool, block=None, fused: bool = False) -> nw.Sequential:
    """``net`` (fused first if ``fused``) with every conv layer that names no rule, those in residual blocks
    included, given ``rule``, ``store_phi`` and ``block`` (a residual block's 1x1 projection takes the backend's
    default). ``rule="winograd"`` goes to the layers it computes (3x3, stride 1, no dilation), the backend's default
    rule to the others (with ``block``, im2col's phi(pad(Z)) in blocks too, where that default is im2col; with
    ``store_phi``, stored: ``OTHERS_STORED``)."""
    net = net.fuse() if fused else net
    if rule == "winograd":
        net, others_stored = net.with_convs(_winograd, rule=rule, store_phi=False, block=block), store_phi
        rule, store_phi = conv.resolve("rule auto", None, None)
        # in blocks: the others too, where they build phi(pad(Z)), unless they store it (``OTHERS_STORED``)
        block = block if rule == "im2col" and not others_stored else None
        store_phi = (store_phi or others_stored) and block is None
    return net.with_convs(_open, rule=rule, store_phi=store_phi, block=block)


def _open(layer: nw.Layer) -> bool:
    """A conv layer that names no rule, or a residual block with one in its body."""
    if isinstance(layer, nw.Residual):
        return any(_open(inner) for inner in layer.layers)
    return isinstance(layer, nw.Conv) and layer.rule is None and layer.store_phi is None and layer.block is None \
        and layer.grad != "autodiff"


def backend_default(net: nw.Sequential, log: Callable[[str], None], why: str) -> nw.Sequential:
    """``net`` with the backend's default rule written into every open conv layer (so a resume reuses it),
    untimed, logged with ``why``."""
    rule, store_phi = conv.resolve("rule auto", None, None)
    log(f"rule auto: {label(rule, store_phi)}, the backend's default, for the conv layers ({why})")
    return uniform(net, rule, store_phi)


def time_network(net: nw.Sequential, input_shape: tuple, batch: int, dtype, repeats: int = TIMINGS,
                 retimings: int = RETIMINGS, progress: bool = False) -> dict[str, dict]:
    """The fastest of ``repeats`` timings of one jitted gradient of the objective (softmax cross-entropy) on a
    random batch, for each candidate given to every open conv layer, their median, and its compiled temporary
    memory: label -> {"ms", "median_ms", "temp_mb"} (None where the backend reports no memory). The candidates are
    timed round-robin, so that the machine's drift affects them alike; the minimum chooses, since other work on the
    machine only ever adds time (on the shared 2-core VM a median of 5 once chose unfused im2col for
    simplenn-mnist, 7% slower than the fused block in the step table timed right after). Those within ``CLOSE``
    of the fastest are then timed ``retimings`` more rounds among themselves, their minimum and median taken over
    all their rounds: the ones a tie can be decided between get a steadier median. ``progress``: a progress bar
    on stderr for the compiling (a candidate at a time; most of the time on a CPU) and for the rounds.

    A candidate that cannot run this network is skipped, not fatal: one whose arrays an op refuses as too large
    (``conv.MAX_ENTRIES``: phi(pad(Z)) for a whole batch of large images) or that XLA cannot compile or run (out of
    a GPU's memory): label -> {"ms": None, "median_ms": None, "temp_mb": None, "skipped": why}. If none can run,
    the first candidate's error is raised."""
    from tqdm import tqdm

    from jaxcnn import objective

    keys = jax.random.split(jax.random.key(0), 3)
    params = net.init(keys[0], input_shape, dtype)
    x = jax.random.normal(keys[1], (batch, *input_shape), dtype)
    classes = net.shapes(input_shape)[-1][-1]
    y = jax.random.randint(keys[2], (batch,), 0, classes)
    def gradient(tuned: nw.Sequential):
        return jax.jit(jax.grad(lambda p, x, y: objective.objective(p, tuned, x, y)[0])).lower(params, x, y).compile()

    def bar(what: str, total: int, unit: str):
        return tqdm(total=total, desc=f"rule auto: {what}", unit=unit, disable=not progress, leave=False,
                    file=sys.stderr)

    compiled, skipped, first_error = {}, {}, None
    with bar("compiling", len(candidates(net)), "candidate") as shown:
        for c in candidates(net):
            name = label(*c)
            shown.set_postfix_str(name)
            try:
                step = gradient(uniform(net, *c))
                jax.block_until_ready(step(params, x, y))  # out of memory shows in a first run
                compiled[name] = step
            except (ValueError, jax.errors.JaxRuntimeError) as err:
                skipped[name] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:400]}"
                first_error = first_error or err
            shown.update()
    if not compiled:
        raise first_error

    def timings(names, rounds):
        with bar(f"timing {len(names)} candidates", rounds, "round") as shown:
            return bench.round_robin({name: (compiled[name], (params, x, y)) for name in names}, rounds,
                                     statistic=list, each_round=shown.update)

    seconds = timings(compiled, repeats)
    fastest = min(map(min, seconds.values()))
    close = [name for name, s in seconds.items() if min(s) <= fastest * (1 + CLOSE)]
    if len(close) > 1 and retimings:
        for name, more in timings(close, retimings).items():
            seconds[name] += more

    def result(name):
        if name in skipped:
            return {"ms": None, "median_ms": None, "temp_mb": None, "skipped": skipped[name]}
        s = seconds[name]
        return {"ms": min(s) * 1e3, "median_ms": float(np.median(s)) * 1e3,
                "temp_mb": bench.memory(compiled[name]).get("temp_mb")}

    return {label(*c): result(label(*c)) for c in candidates(net)}


def choose(timings: dict[str, dict], net: nw.Sequential, max_temp_mb: float | None = None
           ) -> tuple[str, bool, str | None, bool]:
    """The candidate to use, from ``time_network``'s timings: the fastest (by the minimum), unless another within
    ``TIE`` of it by the minimum and by the median needs less temporary memory; then the lightest of those (faster
    first among equals). Skipped candidates are not chosen. ``max_temp_mb``: only the candidates whose compiled
    gradient needs at most that many MiB of temporary memory count, as cuDNN's workspace limit (all where the
    backend reports none); where none does, the lightest."""
    timed = [c for c in candidates(net) if timings[label(*c)].get("skipped") is None]
    fits = within_limit(timings, [label(*c) for c in timed], max_temp_mb)
    timed = [c for c in timed if label(*c) in fits] or [min(timed, key=lambda c: timings[label(*c)]["temp_mb"])]
    ms = {c: timings[label(*c)]["ms"] for c in timed}
    median = {c: timings[label(*c)]["median_ms"] for c in timed}
    fastest = min(ms, key=ms.get)
    tied = [c for c in ms if ms[c] <= ms[fastest] * (1 + TIE) and median[c] <= median[fastest] * (1 + TIE)]
    memory = {c: timings[label(*c)].get("temp_mb") for c in tied}
    if None in memory.values():  # a backend that reports no memory: the fastest
        return fastest
    return min(tied, key=lambda c: (memory[c], ms[c]))


def within_limit(timings: dict[str, dict], names: list[str], max_temp_mb: float | None) -> list[str]:
    """Those of the timed candidates ``names`` whose temporary memory is at most ``max_temp_mb`` MiB: all of them
    without a limit, or where the backend reports no memory."""
    if max_temp_mb is None or any(timings[name]["temp_mb"] is None for name in names):
        return list(names)
    return [name for name in names if timings[name]["temp_mb"] <= max_temp_mb]


def check_limit(where: str, name: str, value) -> None:
    """A limit on the candidates' temporary memory: None (no limit) or a positive, finite number of MiB."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not 0 < value < float("inf")):
        raise ValueError(f"{where}: {name} must be a positive number of MiB, or None for no limit, got {value!r}")


def tune(net: nw.Sequential, input_shape: tuple, batch: int, dtype=jnp.float32, *, log: Callable[[str], None] = print,
         remeasure: bool = False, cache: Path | None = None, min_flops: float = 0, progress: bool = False,
         max_temp_mb: float | None = None) -> tuple[nw.Sequential, dict]:
    """``net`` (fused, if that won) with every conv layer that names no rule given the candidate fastest on this
    machine for a batch of ``batch`` images of ``input_shape`` (from the cache when it holds this geometry and
    ``remeasure`` is off; ``choose`` picks), and ``{"rule", "store_phi", "block", "fused", "ms": {candidate: ms},
    "temp_mb": {candidate: MiB}, "measured": bool}`` (None when no layer was open; a candidate that could not run
    this network, ``time_network``, has ms None and is named in the log with why). New timings are written to the
    cache (atomically). A geometry the cache lacks whose step counts fewer than ``min_flops``
    (``bench.count_flops``) is not timed: its layers get the backend's default rule (``ms`` None). ``progress``:
    progress bars while timing (``time_network``); the last line says how long it took. ``max_temp_mb``: the
    candidates needing more temporary memory than that are passed over (``choose``)."""
    check_limit("tune", "max_temp_mb", max_temp_mb)
    if not any(_open(layer) for layer in net.layers):
        return net, None
    input_shape = tuple(input_shape)
    cache = cache_file() if cache is None else Path(cache)
    store, machine = _read(cache), machine_key()
    if not isinstance(store.get(machine), dict):
        store[machine] = {}
    entries = store[machine]
    key = geometry_key(net, input_shape, batch, dtype)
    measured = remeasure or not _complete(entries.get(key), net)
    if measured and (flops := bench.count_flops(net, input_shape, batch)) < min_flops:
        rule, store_phi = conv.resolve("rule auto", None, None)
        return backend_default(net, log, f"a step of {flops / 1e9:.2g} GFLOP is too small for timing the rules to "
                                         f"pay: below {min_flops / 1e9:g}; `jaxcnn bench --tune` times them"), \
            {"rule": rule, "store_phi": store_phi, "block": None, "fused": False, "ms": None, "temp_mb": None,
             "measured": False}
    if measured:
        log(f"rule auto: timing {len(candidates(net))} candidate rules on this machine for this geometry (compiled "
            f"and run {TIMINGS} times each, those within {CLOSE:.0%} of the fastest {RETIMINGS} times more; the "
            f"result is kept in {cache})")
        start = time.perf_counter()
        entries[key] = {name: {k: round(v, 4) if isinstance(v, float) else v for k, v in timing.items()}
                        for name, timing in time_network(net, input_shape, batch, dtype, progress=progress).items()}
        took = time.perf_counter() - start
        try:
            atomic_write(cache, strict_json(store, indent=1) + "\n")
        except OSError as err:  # a read-only home: the run goes on, timing again next time
            log(f"rule auto: could not write the cache {cache} ({err}); the timings are not kept")
    timings = entries[key]
    best = choose(timings, net, max_temp_mb)
    ms = {name: t["ms"] for name, t in timings.items()}
    temp_mb = {name: t["temp_mb"] for name, t in timings.items()}
    listed = ", ".join(f"{name} skipped ({t['skipped']})" if t.get("skipped") is not None else
                       f"{name} {t['ms']:.2f} ms" + ("" if t["temp_mb"] is None else f" / {t['temp_mb']:.1f} MiB")
                       for name, t in timings.items())
    timed = [name for name in ms if ms[name] is not None]
    limit = "" if max_temp_mb is None else f"at most {max_temp_mb:g} MiB of temporary memory"
    fitting = within_limit(timings, timed, max_temp_mb)
    fastest, chosen = min(fitting or timed, key=ms.get), label(*best)
    if limit and any(temp_mb[name] is None for name in timed):
        why = f"; the limit of {limit} not applied: this backend reports no memory"
    elif not fitting:
        why = f"; none needs {limit}: the lightest"
    elif ms[chosen] != ms[fastest]:
        why = f"; the lightest within {TIE:.0%} of the fastest{' needing ' + limit if limit else ''}, " \
              f"{fastest}, by minimum and median"
    else:
        why = "" if fastest == min(timed, key=ms.get) else f"; the fastest needing {limit}"
    log(f"rule auto: {label(*best)} for the conv layers ({listed}: a gradient of the network, its temporary "
        f"memory; {f'measured now, in {took:.0f} s' if measured else 'timed earlier, ' + str(cache)}{why})")
    rule, store_phi, block, fused = best
    return uniform(net, *best), {"rule": rule, "store_phi": store_phi, "block": block, "fused": fused, "ms": ms,
                                 "temp_mb": temp_mb, "measured": measured}
