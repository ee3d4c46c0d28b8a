"""rule="auto" (jaxcnn.autotune): the conv layers get the candidate rule timed fastest for the whole network, the
timings are cached per machine, and a run records and reuses the rules it chose."""

import contextlib
import json
import re

import numpy as np
import pytest

import jaxcnn as jc
from jaxcnn import autotune, bench, checkpoint, cli, train


def fake_timings(fastest):
    """time_network replaced by fixed timings (ms, temporary MiB) that make the candidate ``fastest`` win (by
    more than autotune.TIE), and a call log."""
    calls = []

    def time_network(net, input_shape, batch, dtype, repeats=5, progress=False):
        calls.append((input_shape, batch))
        names = [autotune.label(*candidate) for candidate in autotune.candidates(net)]
        return {name: {"ms": 1 if name == fastest else 2 + i, "median_ms": 1.5 if name == fastest else 3 + i,
                       "temp_mb": 10.0 - i} for i, name in enumerate(names)}

    return time_network, calls


def conv_rules(net):
    return [(layer.rule, layer.store_phi, layer.block) for layer in net.layers if isinstance(layer, jc.Conv)]


NET = jc.Sequential([jc.Conv(4, 3, padding=1), jc.ReLU(), jc.MaxPool(2), jc.Conv(6, 3, rule="im2col"),
                     jc.Flatten(), jc.Dense(3)])


def test_the_fastest_candidate_is_given_to_every_open_layer_and_the_cache_is_reused(tmp_path, monkeypatch):
    time_network, calls = fake_timings("flip")
    monkeypatch.setattr(autotune, "time_network", time_network)
    cache, lines = tmp_path / "rules.json", []
    tuned, choice = autotune.tune(NET, (8, 8, 1), 4, cache=cache, log=lines.append)
    assert conv_rules(tuned) == [("flip", False, None), ("im2col", None, None)]  # the layer naming its rule keeps it
    assert calls == [((8, 8, 1), 4)] and choice["measured"] and (choice["rule"], choice["fused"]) == ("flip", False)
    assert lines[0] == f"rule auto: timing 10 candidate rules on this machine for this geometry (compiled and run " \
                       f"{autotune.TIMINGS} times each, those within {autotune.CLOSE:.0%} of the fastest " \
                       f"{autotune.RETIMINGS} times more; the result is kept in {cache})"
    assert lines[1:] == ["rule auto: flip for the conv layers (im2col (phi stored) 2.00 ms / 10.0 MiB, im2col (phi in "
                     "blocks) 3.00 ms / 9.0 MiB, flip 1.00 ms / 8.0 MiB, winograd 5.00 ms / 7.0 MiB, winograd (in "
                     "blocks) 6.00 ms / 6.0 MiB, fused, im2col (phi stored) 7.00 ms / 5.0 MiB, fused, im2col (phi in "
                     "blocks) 8.00 ms / 4.0 MiB, fused, flip 9.00 ms / 3.0 MiB, fused, winograd 10.00 ms / 2.0 MiB, "
                     "fused, winograd (in blocks) 11.00 ms / 1.0 MiB: a gradient of the network, its temporary "
                     "memory; measured now, in 0 s)"]
    stored = json.loads(cache.read_text())
    assert list(stored) == [autotune.machine_key()] and len(stored[autotune.machine_key()]) == 1

    monkeypatch.setattr(autotune, "time_network", fake_timings("fused, im2col (phi stored)")[0])
    again, choice = autotune.tune(NET, (8, 8, 1), 4, cache=cache, log=lines.append)
    assert again == tuned and not choice["measured"] and "timed earlier" in lines[-1]  # read back, not timed
    anew, _ = autotune.tune(NET, (8, 8, 1), 4, cache=cache, remeasure=True, log=lines.append)
    assert anew == autotune.uniform(NET, "im2col", True, fused=True) and anew.layers[0].type == "conv_relu_pool"
    assert autotune.tune(NET, (8, 8, 1), 8, cache=cache, log=lines.append)[1]["measured"]  # another batch
    assert autotune.tune(tuned, (8, 8, 1), 4, cache=cache, log=lines.append) == (tuned, None)  # nothing open


def test_real_timings_a_damaged_cache_and_an_unwritable_one(tmp_path, monkeypatch, capsys):
    """Every candidate timed TIMINGS rounds, those within CLOSE of the fastest RETIMINGS more; the minimum and
    median of all a candidate's rounds kept; progress bars while compiling and timing, and the time it took."""
    rounds, round_robin = [], bench.round_robin
    def recorded(functions, count, statistic, each_round):
        rounds.append((count, seconds := round_robin(functions, count, statistic, each_round)))
        return {name: list(s) for name, s in seconds.items()}

    monkeypatch.setattr(bench, "round_robin", recorded)
    cache = tmp_path / "rules.json"
    cache.write_text("{not json")
    lines = []
    tuned, choice = autotune.tune(NET, (8, 8, 1), 2, cache=cache, log=lines.append, progress=True)
    monkeypatch.setattr(bench, "round_robin", round_robin)
    bars = capsys.readouterr().err
    assert "rule auto: compiling" in bars and "/10 " in bars and "rule auto: timing 10" in bars, bars
    assert re.search(r"measured now, in \d+ s", lines[-1]), lines
    (first, timed), *again = rounds
    fastest = min(map(min, timed.values()))
    close = {name for name, s in timed.items() if min(s) <= fastest * (1 + autotune.CLOSE)}
    retimed = again[0][1] if again else {}
    assert first == autotune.TIMINGS and len(timed) == 10 and len(again) <= 1
    assert set(retimed) == (close if len(close) > 1 else set()) and all(a == autotune.RETIMINGS for a, _ in again)
    [stored] = json.loads(cache.read_text())[autotune.machine_key()].values()
    for name, s in timed.items():
        s = s + retimed.get(name, [])
        assert abs(choice["ms"][name] - 1e3 * min(s)) < 1e-3
        assert abs(stored[name]["median_ms"] - 1e3 * float(np.median(s))) < 1e-3
    assert len(choice["ms"]) == 10 and all(v > 0 for v in choice["ms"].values())  # really timed
    assert all(v > 0 for v in choice["temp_mb"].values()) and choice["temp_mb"].keys() == choice["ms"].keys()
    chosen = autotune.label(*conv_rules(tuned)[0], choice["fused"])
    assert choice["ms"][chosen] <= min(choice["ms"].values()) * (1 + autotune.TIE)
    assert (tuned.layers[0].type == "conv_relu_pool") == choice["fused"]
    key = next(iter(json.loads(cache.read_text())[autotune.machine_key()]))

    monkeypatch.setattr(autotune, "time_network", fake_timings("flip")[0])
    complete = json.loads(cache.read_text())[autotune.machine_key()][key]
    for damaged in ({autotune.machine_key(): "x"}, {autotune.machine_key(): {key: {"flip": -1}}},
                    {autotune.machine_key(): {key: {**complete, "flip": {"ms": 1.0, "median_ms": 1.0}}}},
                    {autotune.machine_key(): {key: {**complete, "flip": {"ms": 1.0, "temp_mb": 1.0}}}}):
        cache.write_text(json.dumps(damaged))
        assert autotune.tune(NET, (8, 8, 1), 2, cache=cache, log=lambda line: None)[1]["measured"]
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    lines = []
    tuned, _ = autotune.tune(NET, (8, 8, 1), 2, cache=blocked / "rules.json", log=lines.append)
    assert conv_rules(tuned)[0] == ("flip", False, None) and "could not write the cache" in lines[1], lines


def test_a_candidate_that_cannot_run_the_network_is_skipped_not_fatal(tmp_path, monkeypatch):
    """A candidate whose arrays an op refuses (conv.MAX_ENTRIES; on a GPU also one out of memory) is skipped with
    its reason and the others decide; the cache keeps the skip; if no candidate can run, the error is raised."""
    from jaxcnn.ops import conv

    candidates, time_network = autotune.candidates, autotune.time_network
    monkeypatch.setattr(autotune, "candidates", lambda net: candidates(net)[:3])  # phi stored, phi in blocks, flip
    monkeypatch.setattr(conv, "MAX_ENTRIES", 1000)  # conv1's phi(pad(Z)): 2 * 8 * 8 * 9 = 1152 entries; output 512
    cache, lines = tmp_path / "rules.json", []
    tuned, choice = autotune.tune(NET, (8, 8, 1), 2, cache=cache, log=lines.append)
    assert conv_rules(tuned)[0] == ("flip", False, None) and choice["ms"]["flip"] > 0, lines
    assert choice["ms"]["im2col (phi stored)"] is None and choice["ms"]["im2col (phi in blocks)"] is None
    assert "(phi stored) skipped (ValueError: layer 0 " in lines[-1] and "phi(pad(Z)) would have shape (2, 8, 8, 9)" \
        in lines[-1], lines
    monkeypatch.setattr(autotune, "time_network", lambda *args, **kwargs: pytest.fail("timed again"))
    assert autotune.tune(NET, (8, 8, 1), 2, cache=cache, log=lines.append) == (tuned, {**choice, "measured": False})
    monkeypatch.setattr(autotune, "time_network", time_network)
    monkeypatch.setattr(conv, "MAX_ENTRIES", 300)  # now every candidate's first layer is refused
    with pytest.raises(ValueError, match="would have shape"):
        autotune.tune(NET, (8, 8, 1), 2, cache=cache, remeasure=True, log=lines.append)


def test_winograd_is_a_candidate_where_an_open_layer_is_3x3_with_stride_1(tmp_path, monkeypatch):
    """It is timed only for networks with an open 3x3, stride-1 conv layer; when it wins, those layers take it and
    the others (5x5 here) the backend's default."""
    labels = lambda net: [autotune.label(*c) for c in autotune.candidates(net)]
    assert {"winograd", "winograd (in blocks)", "fused, winograd", "fused, winograd (in blocks)"} <= set(labels(NET))
    assert "winograd" not in labels(jc.preset("lenet5"))  # 5x5 kernels only
    assert "winograd" not in labels(jc.Sequential([jc.Conv(4, 3, stride=2), jc.Conv(4, 3, rule="flip"),
                                                   jc.Flatten(), jc.Dense(2)]))  # strided, or its rule named
    net = jc.Sequential([jc.Conv(4, 5, padding=2), jc.ReLU(), jc.Conv(4, 3, padding=1), jc.ReLU(), jc.MaxPool(2),
                         jc.Flatten(), jc.Dense(3)])
    monkeypatch.setattr(autotune, "time_network", fake_timings("fused, winograd")[0])
    tuned, choice = autotune.tune(net, (8, 8, 1), 4, cache=tmp_path / "rules.json", log=lambda line: None)
    default = jc.ops.conv.resolve("test", None, None)
    assert (choice["rule"], choice["fused"]) == ("winograd", True)
    assert conv_rules(tuned) == [(*default, None), ("winograd", False, None)]
    assert tuned.layers[2].type == "conv_relu_pool"
    monkeypatch.setattr(autotune, "time_network", fake_timings("winograd (in blocks)")[0])
    tuned, choice = autotune.tune(net, (8, 8, 1), 4, cache=tmp_path / "other.json", log=lambda line: None)
    assert (choice["rule"], choice["block"], choice["fused"]) == ("winograd", "auto", False)
    lighter = ("im2col", False, "auto") if default[0] == "im2col" else (*default, None)  # phi(pad(Z)) in blocks too
    assert conv_rules(tuned) == [lighter, ("winograd", False, "auto")]
    first = "im2col (phi in blocks: auto)" if default[0] == "im2col" else default[0]
    assert train.conv_rules(tuned, default[0]) == {"conv1": first, "conv2": "winograd (in blocks: auto)"}  # summary
    # the others' phi(pad(Z)) stored instead: a candidate where the backend's default builds it and such layers exist
    stored = "fused, winograd (in blocks), others phi stored"
    assert (stored in labels(net)) == (default[0] == "im2col") and not any("others" in name for name in labels(NET))
    if default[0] == "im2col":
        monkeypatch.setattr(autotune, "time_network", fake_timings(stored)[0])
        tuned, choice = autotune.tune(net, (8, 8, 1), 4, cache=tmp_path / "third.json", log=lambda line: None)
        assert [choice[k] for k in ("rule", "store_phi", "block", "fused")] == ["winograd", True, "auto", True]
        assert conv_rules(tuned) == [("im2col", True, None), ("winograd", False, "auto")]


def test_a_run_with_rule_auto_records_and_keeps_its_rules(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAXCNN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "time_network", fake_timings("fused, flip")[0])
    monkeypatch.setattr(autotune, "MIN_FLOPS", 0)  # digits-cnn's step is too small to be timed otherwise
    out = tmp_path / "run"
    assert cli.main(["train", "--rule", "auto", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    assert "rule auto: fused, flip for the conv layers" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rule"] == "auto" and summary["train"]["rule"] == "auto"
    assert summary["conv_rules"] == {"conv1": "flip", "conv2": "flip"}
    network = checkpoint.load_model(out).network
    assert network == autotune.uniform(jc.preset("digits-cnn"), "flip", False, fused=True)  # what the model keeps
    assert cli.main(["evaluate", "--checkpoint", str(out)]) == 0
    assert "(reproduced)" in capsys.readouterr().out


def test_resume_keeps_the_rules_the_run_chose(tmp_path, monkeypatch, capsys):
    """A run killed after its first checkpoint resumes with the rules it recorded, whatever the cache says now."""
    from tests.test_reliability import crash_after

    monkeypatch.setenv("JAXCNN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "time_network", fake_timings("flip")[0])
    monkeypatch.setattr(autotune, "MIN_FLOPS", 0)
    out = tmp_path / "run"
    crash_after(1, monkeypatch)
    with contextlib.suppress(KeyboardInterrupt):
        cli.main(["train", "--rule", "auto", "--epochs", "2", "--out", str(out), "--no-progress"])
    assert checkpoint.list_states(out / "checkpoints") and not (out / "summary.json").exists()  # cut short
    monkeypatch.setattr(train, "save_state", checkpoint.save_state)
    monkeypatch.setattr(autotune, "time_network", fake_timings("fused, im2col (phi in blocks)")[0])
    autotune.tune(jc.preset("digits-cnn"), (8, 8, 1), 32, remeasure=True, log=lambda line: None)  # cache: another
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    resumed = capsys.readouterr().out
    assert "resuming" in resumed and "rule auto:" not in resumed, resumed  # nothing timed or chosen again
    assert checkpoint.load_model(out).network == autotune.uniform(jc.preset("digits-cnn"), "flip", False)


def test_residual_bodies_are_tuned_and_a_small_step_takes_the_default_untimed(tmp_path, monkeypatch):
    """The candidate reaches the conv layers inside residual blocks; a geometry below ``min_flops`` that the cache
    lacks is not timed and gets the backend's default, written into the layers (a resume reuses it); one the
    cache holds uses the timings."""
    net = jc.Sequential([jc.Conv(4, 3, padding=1), jc.Residual([jc.Conv(4, 3, padding=1), jc.ReLU(),
                                                                jc.Conv(6, 3, stride=2, padding=1)]),
                         jc.GlobalAvgPool(), jc.Dense(3)])
    cache, lines = tmp_path / "rules.json", []
    monkeypatch.setattr(autotune, "time_network", fake_timings("flip")[0])
    tuned, _ = autotune.tune(net, (8, 8, 1), 4, cache=cache, log=lines.append)
    inner = tuned.layers[1].layers
    assert [(c.rule, c.store_phi) for c in (tuned.layers[0], inner[0], inner[2])] == [("flip", False)] * 3

    def untimed(*args, **kwargs):
        raise AssertionError("timed a step below min_flops")

    monkeypatch.setattr(autotune, "time_network", untimed)
    assert autotune.tune(net, (8, 8, 1), 4, cache=cache, log=lines.append, min_flops=1e12)[0] == tuned  # cached
    flops = bench.count_flops(net, (8, 8, 1), 2)
    small, choice = autotune.tune(net, (8, 8, 1), 2, cache=cache, log=lines.append, min_flops=flops + 1)
    rule, store_phi = jc.ops.conv.resolve("test", None, None)
    assert small == autotune.uniform(net, rule, store_phi) and choice["ms"] is None and not choice["measured"]
    assert "the backend's default" in lines[-1] and f"{flops / 1e9:.2g} GFLOP" in lines[-1], lines[-1]


def test_the_trainer_tunes_by_default_and_falls_back_with_several_processes(tmp_path, monkeypatch, capsys):
    import types

    import jax

    from jaxcnn import _malloc, train

    assert train.TrainConfig().rule == "auto"
    default = autotune.label(*jc.ops.conv.resolve("test", None, None))  # "im2col (phi stored)" on CPU
    out = tmp_path / "run"
    assert cli.main(["train", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0  # digits: under 1 GFLOP
    assert f"rule auto: {default}, the backend's default" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["conv_rules"] == {"conv1": default, "conv2": default}
    assert summary["allocator"] == _malloc.allocator()  # this process: cli.main(argv) does not re-execute

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    lines = []
    prep = types.SimpleNamespace(input_shape=(8, 8, 1))
    net = train.tuned(jc.preset("digits-cnn"), prep, train.TrainConfig(), None, lines.append)
    assert net == autotune.uniform(jc.preset("digits-cnn"), *jc.ops.conv.resolve("test", None, None))
    assert "several processes" in lines[0]


def test_among_candidates_tied_in_time_the_one_needing_least_memory_is_chosen(tmp_path, monkeypatch):
    """Within autotune.TIE of the fastest by minimum and median, the lightest wins (then the faster); beyond it by
    either, or where the backend reports no memory, the fastest."""
    def timings(**ms_and_mb):
        names = {"stored": "im2col (phi stored)", "blocks": "im2col (phi in blocks)", "flip": "flip"}
        out = {autotune.label(*c): {"ms": 1e3, "median_ms": 1e3, "temp_mb": 1.0} for c in autotune.candidates(NET)}
        for k, (ms, mb, *median) in ms_and_mb.items():
            out[names[k]] = {"ms": ms, "median_ms": median[0] if median else ms, "temp_mb": mb}
        return out

    tie = 1 + autotune.TIE
    assert autotune.choose(timings(stored=(100, 90.0), blocks=(100 * tie * 0.999, 45.0), flip=(200, 30.0)), NET) \
        == ("im2col", False, "auto", False)
    assert autotune.choose(timings(stored=(100, 90.0), blocks=(100 * tie * 1.001, 45.0), flip=(200, 30.0)), NET) \
        == ("im2col", True, None, False)
    assert autotune.choose(timings(stored=(100, 90.0, 110), blocks=(100.2, 45.0, 122), flip=(200, 30.0)), NET) \
        == ("im2col", True, None, False)  # minima tied, medians 11% apart (resnet-small, 2026-11-24): not a tie
    assert autotune.choose(timings(stored=(100, 45.0), blocks=(101, 45.0), flip=(100.5, 45.0)), NET) \
        == ("im2col", True, None, False)  # equal memory: the faster
    assert autotune.choose(timings(stored=(100, None), blocks=(101, 45.0), flip=(200, 30.0)), NET) \
        == ("im2col", True, None, False)  # no memory reported
    tied = timings(stored=(100, 90.0), blocks=(101, 45.0), flip=(200, 30.0))
    monkeypatch.setattr(autotune, "time_network", lambda *args, **kwargs: tied)
    lines = []
    tuned, choice = autotune.tune(NET, (8, 8, 1), 4, cache=tmp_path / "rules.json", log=lines.append)
    assert conv_rules(tuned)[0] == ("im2col", False, "auto") and choice["temp_mb"]["im2col (phi stored)"] == 90.0
    assert lines[-1].endswith("the lightest within 5% of the fastest, im2col (phi stored), by minimum and median)")


def test_a_memory_limit_passes_over_the_candidates_needing_more(tmp_path, monkeypatch, capsys):
    """``max_temp_mb`` (``--rule-memory-mb``), as cuDNN's workspace limit: the fastest candidate within it, the tie
    rule among those, the lightest where none fits; refused where it is no positive number or rule is not auto."""
    time_network, _ = fake_timings("im2col (phi stored)")  # fastest, and the heaviest: 10 MiB; flip 8 MiB, 3.00 ms
    timings = time_network(NET, (8, 8, 1), 4, None)
    assert autotune.choose(timings, NET) == ("im2col", True, None, False)
    assert autotune.choose(timings, NET, max_temp_mb=10.0) == ("im2col", True, None, False)
    assert autotune.choose(timings, NET, max_temp_mb=9.5) == ("im2col", False, "auto", False)  # 9 MiB, 3 ms
    assert autotune.choose(timings, NET, max_temp_mb=0.5) == ("winograd", False, "auto", True)  # the lightest, 1 MiB
    monkeypatch.setattr(autotune, "time_network", time_network)
    lines = []
    tuned, choice = autotune.tune(NET, (8, 8, 1), 4, cache=tmp_path / "rules.json", log=lines.append, max_temp_mb=9)
    assert conv_rules(tuned)[0] == ("im2col", False, "auto") and choice["temp_mb"]["im2col (phi stored)"] == 10.0
    assert lines[-1].endswith("; the fastest needing at most 9 MiB of temporary memory)"), lines[-1]
    autotune.tune(NET, (8, 8, 1), 4, cache=tmp_path / "rules.json", log=lines.append, max_temp_mb=0.5)
    assert lines[-1].endswith("; none needs at most 0.5 MiB of temporary memory: the lightest)"), lines[-1]
    unreported = {name: {**t, "temp_mb": None} for name, t in timings.items()}
    monkeypatch.setattr(autotune, "time_network", lambda *args, **kwargs: unreported)
    tuned, _ = autotune.tune(NET, (8, 8, 1), 4, cache=tmp_path / "unreported.json", log=lines.append, max_temp_mb=9)
    assert conv_rules(tuned)[0] == ("im2col", True, None)  # the fastest: a backend that reports no memory
    assert lines[-1].endswith("; the limit of at most 9 MiB of temporary memory not applied: this backend reports "
                              "no memory)"), lines[-1]
    monkeypatch.setattr(autotune, "time_network", time_network)
    for bad in (0, -1.0, float("nan"), True, "8"):
        with pytest.raises(ValueError, match="max_temp_mb must be a positive number of MiB"):
            autotune.tune(NET, (8, 8, 1), 4, cache=tmp_path / "rules.json", max_temp_mb=bad)
        with pytest.raises(ValueError, match="rule_memory_mb must be a positive number of MiB"):
            train.TrainConfig(rule_memory_mb=bad)
    with pytest.raises(ValueError, match="rule_memory_mb limits the candidates of rule 'auto', not rule 'flip'"):
        train.TrainConfig(rule="flip", rule_memory_mb=64)

    monkeypatch.setenv("JAXCNN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "MIN_FLOPS", 0)  # digits-cnn's step is too small to be timed otherwise
    out = tmp_path / "run"
    assert cli.main(["train", "--epochs", "1", "--rule-memory-mb", "9.5", "--out", str(out), "--no-progress"]) == 0
    assert "rule auto: im2col (phi in blocks) for the conv layers" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["rule_memory_mb"] == 9.5 and summary["conv_rules"]["conv1"].startswith("im2col (phi in")


def test_the_machine_key_tells_cpus_of_one_name_apart_by_family_and_model():
    """Two VMs may both call their CPU "AMD EPYC" (a Zen 3 and a Zen 4): its family and model numbers, and the
    vector extensions, keep their timings apart in the cache."""
    def cpuinfo(model, flags):
        return "\n".join(f"processor\t: {i}\ncpu family\t: 25\nmodel\t\t: {model}\nmodel name\t: AMD EPYC\n"
                         f"flags\t\t: {flags}\n" for i in range(2))

    zen3 = autotune.cpu(cpuinfo(1, "fpu avx avx2 fma"))
    zen4 = autotune.cpu(cpuinfo(17, "fpu avx avx2 fma avx512f avx512_bf16"))
    assert zen3 == ("AMD EPYC (family 25, model 1)", "avx2 fma")
    assert zen4 == ("AMD EPYC (family 25, model 17)", "avx2 fma avx512f avx512_bf16")
    # without family and model numbers (an ARM CPU's /proc/cpuinfo), the name alone
    assert autotune.cpu("model name\t: Some CPU\nFeatures\t: fp asimd\n") == ("Some CPU", "asimd")
