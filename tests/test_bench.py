"""`bumblefast bench`: the report format (every ratio recomputes from what was measured) and a
smoke run of the whole suite at minimum sizes."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env

sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmark modules import each other by name
import benchlib as BL  # noqa: E402


def _section() -> dict:
    ours = BL.measured("ours", 1000, 2.0)
    base = BL.measured("baseline", 1000, 4.0)
    return {
        "config": {},
        "results": {},
        "ratios": [
            BL.ratio("speed", ours, base),
            BL.ratio("memory", BL.memory("ours", 100), BL.memory("ref", 1500)),
            BL.ratio("packing", BL.fraction("packed", 95, 100), BL.fraction("padded", 60, 100)),
        ],
        "points": [BL.point("ours", ours["value"])],
    }


def test_ratios_are_how_many_times_better():
    sec = _section()
    speed, mem, pack = sec["ratios"]
    assert speed["value"] == pytest.approx(2.0)  # 500 tokens/s vs 250
    assert mem["value"] == pytest.approx(15.0)  # 1500 MB / 100 MB
    assert pack["value"] == pytest.approx(0.95 / 0.60)
    assert BL.check_section("x", sec) == []


@pytest.mark.parametrize(
    "tamper, problem",
    [
        (lambda s: s["ratios"][0].update(value=3.0), "recomputed"),  # a copied-in ratio
        (lambda s: s["ratios"][0]["ours"].update(value=900.0), "work / seconds"),  # an edited rate
        (lambda s: s["ratios"][0]["baseline"].update(seconds=0), "positive"),  # nothing timed
        (lambda s: s["ratios"][2]["ours"].update(value=0.99), "part / whole"),
        (lambda s: s.pop("points"), "missing 'points'"),
    ],
)
def test_check_section_catches_numbers_not_measured(tamper, problem):
    sec = copy.deepcopy(_section())
    tamper(sec)
    problems = BL.check_section("x", sec)
    assert any(problem in p for p in problems), problems


def test_ratio_refuses_mixed_units():
    with pytest.raises(ValueError, match="units differ"):
        BL.ratio("x", BL.measured("a", 1, 1.0), BL.memory("b", 1))
    with pytest.raises(ValueError, match="positive time"):
        BL.measured("a", 1, 0.0)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_all_min_writes_a_checked_report(tmp_path):
    """The whole suite at minimum sizes: every section runs, every ratio was measured in this run
    (recomputes from its two measurements, each from work and seconds), table + JSON + PNG."""
    proc = subprocess.run(
        [sys.executable, "-m", "bumblefast", "bench", "all", "--size", "min", "--out", str(tmp_path), "--no_progress"],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=880,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (js,) = tmp_path.glob("*-min.json")
    report = json.loads(js.read_text())
    assert report["schema"] == BL.SCHEMA and report["size"] == "min"
    assert set(report["sections"]) == set(BL.SECTIONS)
    for name, sec in report["sections"].items():
        assert BL.check_section(name, sec) == [], name
        assert sec["ratios"], f"{name}: no ratio measured"
        assert sec["points"], f"{name}: nothing to plot"
        assert sec["seconds"] > 0
    md = js.with_suffix(".md").read_text()
    for sec in report["sections"].values():
        for r in sec["ratios"]:
            assert r["name"] in md
    png = js.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # the ratios differ from each other: no value was filled in from a template
    values = [r["value"] for sec in report["sections"].values() for r in sec["ratios"]]
    assert len(set(values)) > len(values) // 2


# ---------------------------------------------------------------- published tables


def test_published_tables_match_committed_results():
    """README.md and docs/performance.md hold exactly the table their marker's results JSON
    generates (`bumblefast bench report` writes them; edit the run, not the table)."""
    from benchreport import PUBLISHED, publish

    assert publish(None, check=True) == [], (
        f"stale benchmark tables in {PUBLISHED}: run `bumblefast bench report` and commit the result"
    )


def _copy_published(root):
    """The published files and every results JSON their markers (tables, inline values) name,
    copied under `root`."""
    import shutil

    from benchreport import PUBLISHED, sources

    names = set(PUBLISHED)
    for rel in PUBLISHED:
        names |= sources((ROOT / rel).read_text())
    for rel in names:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, root / rel)


def test_report_check_catches_a_hand_edited_number(tmp_path):
    """A copy of the checkout's published files: an edited figure in the JSON (or in a table)
    makes --check report the file; regenerating fixes it and then --check is clean."""
    import re

    from benchreport import BLOCK, PUBLISHED, publish

    source = BLOCK.search((ROOT / "README.md").read_text()).group(1)
    _copy_published(tmp_path)
    assert publish(None, check=True, root=tmp_path) == []
    last = source.split(",")[-1]  # its sections are the ones shown
    report = json.loads((tmp_path / last).read_text())
    r = next(r for sec in report["sections"].values() for r in sec["ratios"])
    r["value"] *= 1.5
    (tmp_path / last).write_text(json.dumps(report))
    assert publish(None, check=True, root=tmp_path) == list(PUBLISHED)
    assert publish(None, root=tmp_path) == list(PUBLISHED)  # regenerated
    assert f"{r['value']:.2f}x" in (tmp_path / "README.md").read_text()
    assert publish(None, check=True, root=tmp_path) == []
    readme = tmp_path / "README.md"
    readme.write_text(re.sub(r"\| (\d+\.\d\d)x", "| 9.99x", readme.read_text(), count=1))  # a hand edit
    assert publish(None, check=True, root=tmp_path) == ["README.md"]
    publish(None, root=tmp_path)
    text = readme.read_text()  # a hand edit in the serve table (generated from bench_serve's own JSON)
    row = re.search(r"\| one at a time \(--max_batch 1\) \| (\d+\.\d\d) \|", text)
    readme.write_text(text.replace(row.group(0), row.group(0).replace(row.group(1), "99.99")))
    assert publish(None, check=True, root=tmp_path) == ["README.md"]
    perf = tmp_path / "docs" / "performance.md"  # and in the shared-prompt table
    text = perf.read_text()
    block = re.search(r"<!-- bench-table: shared_prompt .*?<!-- bench-table: end -->", text, re.S).group(0)
    ratio = re.search(r"\| (\d+\.\d\d)x", block).group(0)
    perf.write_text(text.replace(block, block.replace(ratio, "| 9.99x", 1)))
    assert "| 9.99x" in perf.read_text() and publish(None, check=True, root=tmp_path) == list(PUBLISHED)


def test_report_of_several_runs_takes_each_section_from_the_latest(tmp_path):
    """`bench report ALL.json PREP.json`: the prep rows come from the later (prep-only) run, the
    other sections from the whole run, and the header names both runs."""

    from benchreport import BLOCK, PUBLISHED, publish

    source = BLOCK.search((ROOT / "README.md").read_text()).group(1).split(",")[0]
    _copy_published(tmp_path)
    base = json.loads((tmp_path / source).read_text())
    prep = copy.deepcopy(base["sections"]["prep"])
    r = prep["ratios"][0]
    r["name"] = "a prep comparison only the later run has"
    later = {**base, "date": "2099-01-01", "seconds": 120.0, "sections": {"prep": prep}}
    (tmp_path / "later.json").write_text(json.dumps(later))
    assert publish([str(tmp_path / source), str(tmp_path / "later.json")], root=tmp_path) == list(PUBLISHED)
    readme = (tmp_path / "README.md").read_text()
    block = BLOCK.search(readme).group(0)
    assert f"begin {source},later.json " in block
    assert "Section `prep` from `bumblefast bench prep --size cpu` on" in block and "(2099-01-01," in block
    assert r["name"] in block  # the later run's prep rows ...
    assert block.count("| prep |") == len(prep["ratios"])  # ... and only those
    for name in ("train", "kernels"):  # the other sections from the whole run
        assert block.count(f"| {name} |") == len(base["sections"][name]["ratios"])
    assert publish(None, check=True, root=tmp_path) == []  # the marker names both: regenerates the same


def test_report_names_verdict_and_target():
    """Rounds give a verdict (ranges overlap -> within noise) and a target is marked met/MISSED."""
    from benchreport import _claim

    ours = BL.rounds("ours", 100, [1.0, 1.1, 0.9, 1.2, 1.0])
    base = BL.rounds("base", 100, [1.05, 1.0, 1.3, 1.1, 0.95])
    r = BL.ratio("x", ours, base)
    assert r["verdict"] == "within noise" and ours["value"] == pytest.approx(100.0)
    assert ours["range"] == pytest.approx([100 / 1.2, 100 / 0.9])
    fast = BL.ratio("y", BL.rounds("ours", 200, [1.0, 1.05, 0.98]), base)
    assert fast["verdict"] == "faster"
    fast["target"] = 1.5
    assert "faster; target >= 1.5x met" in _claim(fast)
    fast["target"] = 2.5
    assert "MISSED" in _claim(fast)
    fast["caveat"] = "not like for like: 2 ranks did 0.67x the CPU-s per token of 1 rank"
    assert "(faster; not like for like: 2 ranks did 0.67x the CPU-s per token of 1 rank; target" in _claim(fast)


def test_long_history_pairs_keep_the_whole_history_as_prompt(tmp_path):
    """bench_shared_prompt's multi-turn set: the prompt is every turn before the last reply
    (earlier replies included), chosen that reply, rejected another conversation's last reply;
    and it runs at the long seq_len so the unshared layout does not cut the history away."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_shared_prompt as B

    turn = lambda who, v: {"from": who, "value": v}  # noqa: E731
    convs = [
        {"conversations": [turn("human", "q1"), turn("gpt", "a1"), turn("human", "q2"), turn("gpt", "a2")]},
        {"conversations": [turn("human", "short"), turn("gpt", "x")]},  # < 4 turns: not a long history
        {"conversations": [turn("human", "p1"), turn("gpt", "b1"), turn("human", "p2"), turn("gpt", "b2")]},
    ]
    (tmp_path / "duolun_train.json").write_text(json.dumps(convs), encoding="utf-8")
    (tmp_path / "dpo_zh_demo.json").write_text("[]", encoding="utf-8")
    sets = B.data_sets(tmp_path, 1024, 4096, tmp_path)
    assert [(s[0], s[2]) for s in sets] == [
        ("dpo_zh_demo.json", 1024),
        ("duolun_train.json -> long-history multi-turn pairs", 4096),
        ("duolun_train.json -> short-prompt two-turn pairs", 4096),
    ]
    pairs = json.loads(sets[1][1].read_text(encoding="utf-8"))
    assert pairs == [
        {"conversations": convs[0]["conversations"][:3], "chosen": turn("gpt", "a2"), "rejected": turn("gpt", "b2")},
        {"conversations": convs[2]["conversations"][:3], "chosen": turn("gpt", "b2"), "rejected": turn("gpt", "a2")},
    ]
    short = json.loads(sets[2][1].read_text(encoding="utf-8"))
    only = {"conversations": [turn("human", "short")], "chosen": turn("gpt", "x"), "rejected": turn("gpt", "x")}
    assert short == [only]  # one two-turn conversation: its "next" is itself


def _shared_prompt_set(data: str, speedup: float, prompt: float = 0.5, noise: bool = False) -> dict:
    rate = lambda name, r, tokens: {  # noqa: E731
        "name": name, "rows": 4, "tokens_per_pair": tokens,
        "pairs_per_sec_median": r, "pairs_per_sec_min": r * 0.9, "pairs_per_sec_max": r * 1.1,
    }  # fmt: skip
    return {
        "data": data, "seq_len": 1024, "pairs": 8, "prompt_fraction": prompt, "clock": "cpu", "load_average": [0.5],
        "truncated": {"unshared": 2, "shared prompt": 1}, "within_noise": noise, "speedup_median": speedup,
        "results": [rate("ours, unshared", 1.0, 600.0), rate("ours, shared prompt", speedup, 400.0)],
    }  # fmt: skip


def test_shared_prompt_result_holds_runs_and_the_table_takes_each_set_from_the_latest(tmp_path):
    """bench_shared_prompt.py writes a list of runs (`--append` adds one); the published table
    reads every run's sets, a set measured again from the later run, and holds each set to its
    target (>= 1.3x at a prompt share >= 40%, else no slower) with its share of the token bound."""
    import bench_shared_prompt as B
    from benchreport import shared_prompt_sets, shared_prompt_table

    meta = {"command": "python benchmarks/bench_shared_prompt.py", "date": "2099-01-01", "host": "h", "cpus": 2,
            "started": "10:00 UTC", "ended": "10:30 UTC", "load_average_at_start": [0.4], "load_average_at_end": [0.6],
            "device": "cpu", "preset": "bumblebee-tiny", "dtype": "torch.float32", "threads": 1}  # fmt: skip
    path = tmp_path / "bench_shared_prompt_h_2099-01-01.json"
    first = {**meta, "data_sets": [_shared_prompt_set("a", 1.2), _shared_prompt_set("b", 1.0, 0.1, noise=True)]}
    result = B.record(path, first, append=True)  # no file yet: a file of one run
    assert [r["data_sets"][0]["data"] for r in result["runs"]] == ["a"]
    path.write_text(json.dumps(result))
    second = {**meta, "command": meta["command"] + " --only a", "started": "11:00 UTC", "data_sets": [
        _shared_prompt_set("a", 1.4)]}  # fmt: skip
    result = B.record(path, second, append=True)
    assert len(result["runs"]) == 2 and B.record(path, second, append=False)["runs"] == [second]
    assert [(d["data"], d["speedup_median"]) for d in shared_prompt_sets(result)] == [("a", 1.4), ("b", 1.0)]
    text = shared_prompt_table(result, "s.json")
    assert (
        "run 1: `python benchmarks/bench_shared_prompt.py` on h" in text and "run 2: `" in text and "--only a`" in text
    )
    row_a, row_b = (line for line in text.splitlines() if line.startswith(("| a ", "| b ")))
    assert "| 1.40x | 93% | >= 1.3x: met |" in row_a and "| 2 -> 1 |" in row_a  # bound 600/400 = 1.5x
    assert "| 1.00x, within noise | 67% | not slower: met |" in row_b
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps({"data_sets": []}))
    with pytest.raises(SystemExit, match="not a multi-run result"):
        B.record(legacy, second, append=True)


def test_prep_scale_table_states_each_target_and_catches_a_hand_edit(tmp_path):
    """bench_prep_scale's tables (README "Prep at scale"): start-up and kill verdicts from the JSON's
    own targets, 2 workers vs 1 with its range, and a hand-edited wall time is caught by --check."""
    import re

    from benchreport import prep_scale_table, publish

    base = {"date": "d", "host": "h", "cpus": 2, "tokenizer": "/x/qwen2", "load_at_start": [0.5], "load_at_end": [0.6]}
    wall = lambda med, lo, hi: {"median": med, "min": lo, "max": hi}  # noqa: E731
    row = lambda w, med, lo, hi: {  # noqa: E731
        "stage": "pretrain", "tokens": 100, "workers": w, "wall_s": wall(med, lo, hi), "cpu_s": wall(1, 1, 1),
        "tokens_per_s": 5e6, "runs": [{"peak_rss_main_mb": 500.0, "peak_rss_workers_mb": [400.0] * (w - 1 or 0)}],
    }  # fmt: skip
    text = prep_scale_table({**base, "scale": [row(1, 10.0, 9.0, 11.0), row(2, 5.0, 4.0, 6.0)]}, "s.json")
    assert "2 workers 2.00x one worker's wall (range 1.50-2.75)" in text and "within noise" not in text
    text = prep_scale_table({**base, "scale": [row(1, 10.0, 9.0, 11.0), row(2, 9.5, 9.2, 10.0)]}, "s.json")
    assert "(within noise)" in text
    st = {"records": 200, "target_wall_s": 3.0, "wall_s": wall(3.2, 3.0, 3.5), "cpu_s": wall(3, 3, 3),
          "phases_in_process_median_s": {"import": 0.1, "total": 2.0}}  # fmt: skip
    assert "target <= 3.0 s: MISSED" in prep_scale_table({**base, "startup": st}, "s.json")
    _copy_published(tmp_path)
    readme = tmp_path / "README.md"
    text = readme.read_text()
    block = re.search(r"<!-- bench-table: prep_scale \S+scale-kill.*?<!-- bench-table: end -->", text, re.S).group(0)
    edited = re.sub(r"\| (\d+\.\d) \(", "| 1.0 (", block, count=1)
    assert edited != block
    readme.write_text(text.replace(block, edited))
    assert publish(None, check=True, root=tmp_path) == ["README.md"]


# ---------------------------------------------------------------- benchmarks/harness.py


def _harness():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import harness

    return harness


def test_interleave_rotates_the_order_each_round():
    """Every side runs once per round, the order rotated per round (rotate=False: the same order)."""
    H = _harness()
    seen = []
    out = H.interleave(["a", "b", "c"], 4, lambda s, r: seen.append(s) or f"{s}{r}")
    assert seen == list("abcbcacababc")
    assert out == [["a0", "a1", "a2", "a3"], ["b0", "b1", "b2", "b3"], ["c0", "c1", "c2", "c3"]]
    seen.clear()
    H.interleave(["a", "b"], 2, lambda s, r: seen.append(s), rotate=False)
    assert seen == list("abab")


def test_interleave_times_sides_after_a_warm_up_step():
    H = _harness()
    calls = []
    sides = [H.side(n, lambda b, n=n: calls.append((n, b)), [1, 2], 10, 10, [10]) for n in ("x", "y")]
    H.interleave(sides, 2)
    assert calls == [("x", 1), ("y", 1), ("x", 1), ("x", 2), ("y", 1), ("y", 2), ("y", 1), ("y", 2), ("x", 1), ("x", 2)]
    assert all(len(s.round_seconds) == 2 for s in sides)


def test_compare_is_within_noise_when_the_ranges_overlap():
    H = _harness()
    base = BL.rounds("base", 100, [1.0, 1.1, 1.2])
    close = H.compare("x", BL.rounds("ours", 100, [0.95, 1.05, 1.15]), base, target=1.5)
    assert close["verdict"] == "within noise" and close["target"] == 1.5
    assert H.compare("y", BL.rounds("ours", 100, [0.5, 0.55, 0.6]), base)["verdict"] == "faster"
    assert "target" not in H.compare("y", BL.rounds("ours", 100, [0.5, 0.55, 0.6]), base)
    assert H.median_range([3.0, 1.0, 2.0, 10.0]) == (2.5, 1.0, 10.0)


def test_launch_train_runs_torchrun_for_more_than_one_process():
    H = _harness()
    one = H.launch_train({"stage": "pretrain", "max_steps": 3})
    assert one == [sys.executable, "-m", "bumblefast", "train", "--stage", "pretrain", "--max_steps", "3"]
    two = H.launch_train({"stage": "pretrain"}, nproc=2)
    assert two[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"] and two[5] == "--master_port"
    assert two[7:] == ["-m", "bumblefast", "train", "--stage", "pretrain"]


def test_peak_memory_sees_a_step_that_allocates_and_frees():
    """CPU: a 256 MB buffer allocated and freed inside the block shows as its peak (RSS sampled
    by a thread), not as what is left at its end."""
    import torch

    H = _harness()
    with H.PeakMemory(torch.device("cpu")) as peak:
        x = torch.ones(64 * 2**20)  # 256 MB of fp32, touched
        del x
    assert 0.9 * 256 < peak.mb < 256 + 64


def test_gemm_sides_time_each_layout_and_a_row_reads_its_own_mix():
    import torch

    H = _harness()
    shapes = [H.Gemm(64, 32, 16, 2), H.Gemm(8, 8, 24, 1, head=True)]
    sides = H.gemm_sides(shapes, torch.device("cpu"), torch.float32, reps=3)
    assert [sd.work["layout"] for sd in sides] == list(H.GEMM_LAYOUTS)
    # each side: every linear in its one layout, `count` times a rep
    assert all(sd.work["flops"] == 2 * 3 * (64 * 32 * 16 * 2 + 8 * 8 * 24) for sd in sides)
    H.interleave(sides, 3)
    assert all(len(sd.round_seconds) == 3 for sd in sides)
    for sd, secs in zip(sides, ([4.0, 1.0, 2.0], [2.0, 2.0, 2.0], [1.0, 3.0, 5.0])):
        sd.round_seconds = secs  # the rates are read from the rounds, whatever ran them
    f = sides[0].work["flops"]
    fwd = H.gemm_rate(sides, {"forward": 1.0})
    assert fwd["gflops"] == pytest.approx(f / 2.0 / 1e9)
    assert fwd["range"] == pytest.approx([f / 4.0 / 1e9, f / 1e9])
    # a mix: per round, the FLOPs over the time its shares take at each layout's rate
    half = H.gemm_rate(sides, {"forward": 0.5, "input_grad": 0.5})
    assert half["gflops"] == pytest.approx(f / (0.5 * 2.0 + 0.5 * 2.0) / 1e9)  # round 3's 2 s + 2 s
    every = H.gemm_summary(sides)
    per_round = sorted(3 * f / (a + b + c) for a, b, c in zip(*(sd.round_seconds for sd in sides)))
    assert every["gflops"] == pytest.approx(per_round[1] / 1e9)
    assert every["layouts"]["weight_grad"]["gflops"] == pytest.approx(f / 3.0 / 1e9)


def test_gemm_ceiling_head_is_the_fused_heads_product():
    """The head's chunk in the ceiling is the product the fused head computes (its layout), of
    the same values as x @ W.t()."""
    import torch

    from bumblefast.kernels.fused_linear import chunk_logits

    x, w = torch.randn(16, 8), torch.randn(40, 8)
    torch.testing.assert_close(chunk_logits(x, w, "torch"), x @ w.t(), rtol=1e-5, atol=1e-5)
    assert chunk_logits(x, w, "torch").stride() == (1, 16)  # CPU: the column-major view


def test_model_gemm_shapes_are_the_step_linears_and_its_head_chunks():
    from bumblefast import flops
    from bumblefast.kernels.fused_linear import default_chunk_size

    H = _harness()
    cfg = H.model_config("bumblebee-0.5b", 151936)
    shapes = H.model_gemm_shapes(cfg, 1024)
    chunk = default_chunk_size(1024, cfg.hidden_size, cfg.vocab_size, "cpu")
    assert shapes[-1] == (chunk, cfg.hidden_size, cfg.vocab_size, 1024 // chunk, True)
    assert not any(s.head for s in shapes[:-1])
    # the layers' multiply-adds are the non-embedding linear parameters times the tokens
    layer_macs = sum(s.m * s.k * s.n * s.count for s in shapes[:-1])
    linear = flops.param_count(cfg) - cfg.vocab_size * cfg.hidden_size  # tied head: counted once
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    # per layer two RMSNorm weights and the q, k, v biases; the final norm
    norms_biases = cfg.num_hidden_layers * (2 * cfg.hidden_size + cfg.hidden_size + 2 * kv) + cfg.hidden_size
    assert layer_macs == 1024 * (linear - norms_biases)


def test_optimizer_is_adamw_or_sgd_over_trainable_parameters():
    import torch

    H = _harness()
    frozen, trained = torch.nn.Parameter(torch.ones(2), requires_grad=False), torch.nn.Parameter(torch.ones(2))
    opt = H.make_optimizer([frozen, trained], "sgd")
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["params"] == [trained]
    assert isinstance(H.make_optimizer([trained]), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        H.make_optimizer([trained], "lion")


def test_size_real_is_the_train_sections_only():
    from bumblefast.cli import main

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train

    real = bench_train.SIZES["real"]
    assert real.preset == "bumblebee-0.5b" and real.stages == ("sft", "dpo") and real.rounds >= 3
    assert real.optimizer == "sgd" and real.memory and real.gemm and real.profile
    assert main(["bench", "prep", "--size", "real"]) == 1  # a UserError: names the train section
    # real-ours: the same run with our sides only (their own process, the trainer's allocator)
    ours = bench_train.SIZES["real-ours"]
    assert not ours.peers and dataclasses.replace(ours, peers=True) == real
    assert main(["bench", "prep", "--size", "real-ours"]) == 1
    # real-split(-kept): the same run, each party in its own process (split_stage)
    for name, heap in (("real-split", "glibc"), ("real-split-kept", "kept")):
        assert (
            bench_train.SIZES[name].split == heap and dataclasses.replace(bench_train.SIZES[name], split=None) == real
        )
        assert main(["bench", "prep", "--size", name]) == 1


def test_split_stage_gives_each_party_its_own_process_and_allocator(monkeypatch):
    """`--size real-split`'s machinery at the tiny preset (DPO: every role, the reference
    scoring and the end-to-end rows): each party's sides built and stepped in a worker process
    of its own, ours keeping freed memory as `bumblefast train` does, the peers' with glibc's
    default; the rows, their work and the comparisons are those of the one-process run."""
    import os

    import bench_train as B
    import torch

    s = dataclasses.replace(B.SIZES["min"], stages=("dpo",), split="glibc", memory=True, gemm=True, profile=True)
    cpu = torch.device("cpu")
    monkeypatch.setattr(B, "available_mb", lambda: 0.0)  # the parent's guard: no step fits beside another
    split = B.run_stage("dpo", s, cpu, torch.float32, "bumblebee-tiny", None)
    one = B.run_stage(
        "dpo", dataclasses.replace(s, split=None, profile=False), cpu, torch.float32, "bumblebee-tiny", None
    )
    procs = split["processes"]
    assert set(procs) == {"ours", "peers"} and len({p["pid"] for p in procs.values()} | {os.getpid()}) == 3
    assert "BUMBLEFAST_KEEP_FREED_MEMORY=0" in procs["peers"]["malloc"]
    assert procs["ours"]["malloc"] != procs["peers"]["malloc"]
    # memory short before every step: each round hands the other worker's heap back, and that
    # worker's next round is preceded by an untimed step (its round never pays the trim's faults)
    assert all(p["trims_between_rounds"] >= 1 and p["rewarm_steps"] >= 1 for p in procs.values())
    assert "processes" not in one
    same = ("name", "real_tokens", "computed_tokens", "pairs", "steps_per_round", "flops_per_round")
    assert [{k: r.get(k) for k in same} for r in split["results"]] == [
        {k: r.get(k) for k in same} for r in one["results"]
    ]
    key = lambda c: (c["view"], c["ours"], c["baseline"], c["target_id"])  # noqa: E731
    assert [key(c) for c in split["comparisons"]] == [key(c) for c in one["comparisons"]]
    by = {r["name"]: r for r in split["results"]}
    assert all(r["rounds"] == s.rounds and r["step_peak_mb"] > 0 for r in split["results"])
    policy = ["bumblefast packed, precomputed reference", "bumblefast packed, shared prompt, precomputed reference"]
    assert all(by[n]["profile"]["top_ops"] for n in policy)
    assert split["gemm"]["gflops"] > 0 and set(split["gemm"]["layouts"]) == {"forward", "input_grad", "weight_grad"}
    assert all(r["gemm_fraction"] > 0 and r["gemm_gflops"] > 0 for r in split["results"])


def test_reference_scoring_side_keeps_its_own_facts():
    """ref_side's warm-up writes its own step_peak_mb, not its policy side's."""
    H = _harness()
    policy = H.side("policy", lambda b: None, [1], 1, 1, [1], ref_step=lambda b: None)
    ref = H.ref_side("scoring", policy)
    H.warm_up(ref, memory=True)
    assert "step_peak_mb" in ref.facts and "step_peak_mb" not in policy.facts


def test_scaling_ratios_carry_the_timed_steps_spread_and_a_verdict():
    """bench_scaling: a run's timed steps are its rounds, so 2 processes vs 1 says "within noise"
    when the step rates overlap and "faster" only when they do not."""
    import benchlib as BL

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_scaling as S

    def run(processes, step_seconds, tokens_per_step=1000):
        steps = [{"step": i + 3, "tokens_per_sec": tokens_per_step / t} for i, t in enumerate(step_seconds)]
        records = [{"step": 1, "tokens_per_sec": 1.0}, {"step": 2, "tokens_per_sec": 1.0}, *steps]
        return {"zero": 2, "processes": processes, **S.steady_state(records, tokens_per_step, warmup=2)}

    one = S.measurement(run(1, [1.0, 1.1, 0.9]))
    assert one["range"] == pytest.approx([1000 / 1.1, 1000 / 0.9]) and one["value"] == pytest.approx(1000)
    assert BL.ratio("2 vs 1", S.measurement(run(2, [0.5, 0.55, 0.45], 2000)), one)["verdict"] == "faster"
    assert BL.ratio("2 vs 1", S.measurement(run(2, [1.0, 0.8, 1.2])), one)["verdict"] == "within noise"
    assert BL.check_ratio(BL.ratio("2 vs 1", S.measurement(run(2, [1.0, 0.8, 1.2])), one)) == []


PERF_REPORT = """\
# Samples: 3K of event 'cpu-clock:pppH'
#
# Overhead       Samples  Shared Object        Symbol
# ........  ............  ...................  ......
#
    80.00%          2400  libtorch_cpu.so      [.] mkl_blas_def_sgemm_kernel_0_zen
     5.00%           150  libtorch_cpu.so      [.] mkl_blas_def_sgemm_scopy_down16_bdz
     6.00%           180  libtorch_cpu.so      [.] callback_fn<at::native::AVX2::Loop2d<at::native::mul_kernel(...)> >
     3.00%            90  libtorch_cpu.so      [.] at::native::cpu_flash_attention_backward<float>()
     4.00%           120  libgomp.so.1         [.] 0x000000000001e02a
     2.00%            60  [kernel.kallsyms]    [k] clear_page_erms
"""


def test_perf_summary_groups_samples_by_function_family():
    import stepprofile

    prof = stepprofile.perf_summary(PERF_REPORT, steps=2)
    ops = {o["op"]: o for o in prof["top_ops"]}
    assert prof["steps"] == 2 and prof["time_basis"].startswith("perf")
    # the GEMM kernel and its packing copies are one family; 2,550 samples at PERF_HZ
    assert ops["sgemm (MKL)"]["self_ms"] == pytest.approx(2550 * 1e3 / stepprofile.PERF_HZ)
    assert set(ops) == {
        "sgemm (MKL)",
        "mul_kernel",
        "flash attention (CPU)",
        "OpenMP (barrier waits)",
        "kernel (page faults, scheduling)",
    }
    assert prof["share_matmul"] == pytest.approx(0.85)
    assert prof["share_attention"] == pytest.approx(0.03)
    assert [o["op"] for o in prof["top_ops"]][:2] == ["sgemm (MKL)", "mul_kernel"]
    assert sum(o["share"] for o in prof["top_ops"]) == pytest.approx(1.0)


def test_step_profile_of_a_matmul_loop_is_mostly_matmul():
    """perf where it can attach to this process (the CPU path the benchmarks publish), else the
    torch.profiler fallback: either way a step of large matmuls is mostly matmul."""
    import stepprofile
    import torch

    a, b = torch.randn(512, 512), torch.randn(512, 512)

    def step(_):
        for _ in range(400):
            a @ b

    prof = stepprofile.profile_steps(step, [0, 0], torch.device("cpu"))
    assert prof["steps"] == 2
    assert prof["time_basis"].startswith(("perf", "torch.profiler"))
    assert prof["share_matmul"] > 0.5, prof["top_ops"][:3]


def test_split_header_says_where_each_party_ran_and_its_untimed_steps():
    """The real-split table's header: each party's host memory, and (results since session 12)
    how many rounds or profiles an untimed step preceded because the party's heap had been
    handed back."""
    import benchreport as R

    procs = {"ours": {"malloc": "kept"}, "peers": {"malloc": "glibc default"}}
    old = R._processes({}, {"sft": {"processes": procs}})
    assert old == "each party in a process of its own, host memory ours: kept; peers: glibc default; "
    procs["ours"]["rewarm_steps"], procs["peers"]["rewarm_steps"] = 3, 1
    new = R._processes({}, {"sft": {"processes": procs}})
    assert new.startswith(old[:-2]) and "(ours 3, peers 1)" in new


def _one_ratio_section(label: str) -> dict:
    """A well-formed section of one measured ratio (benchlib's format)."""
    ours, base = BL.measured(f"{label} ours", 20.0, 1.0), BL.measured(f"{label} base", 10.0, 1.0)
    return {"config": {}, "results": {}, "ratios": [BL.ratio(label, ours, base)], "points": [BL.point(label, 20.0)]}


def test_a_failing_section_keeps_what_finished(tmp_path, monkeypatch):
    """A long run that fails part-way (the DPO stage of a 60-minute `--size real-split`) writes
    the sections finished before it and the failing section's finished part, named apart from a
    whole run's report, and still fails."""
    import types

    import suite

    def failing(size, work):
        raise BL.Interrupted(MemoryError("the dpo stage ran out of memory"), _one_ratio_section("sft"))

    scripts = {"prep": lambda size, work: _one_ratio_section("prep"), "train": failing}
    monkeypatch.setattr(suite, "load_script", lambda name: types.SimpleNamespace(bench=scripts[name]))
    with pytest.raises(suite.Unfinished) as e:
        suite.run(["prep", "train"], "min", progress=False)
    report = e.value.report
    assert [r["name"] for sec in report["sections"].values() for r in sec["ratios"]] == ["prep", "sft"]
    assert "section train" in report["interrupted"] and "out of memory" in report["interrupted"]
    args = types.SimpleNamespace(what="train", results=[], size="min", out=str(tmp_path), no_progress=True)
    with pytest.raises(suite.Unfinished):
        suite.cli_main(args)
    (js,) = tmp_path.glob("*-train-min-interrupted.json")
    assert json.loads(js.read_text())["sections"]["train"]["ratios"][0]["name"] == "sft"
    assert "Interrupted" in js.with_suffix(".md").read_text()
    # a section that fails before finishing anything is lost as before, with its own error
    scripts["train"] = lambda size, work: (_ for _ in ()).throw(ValueError("bad data"))
    with pytest.raises(suite.Unfinished) as e:
        suite.run(["train"], "min", progress=False)
    assert e.value.report["sections"] == {} and "ValueError: bad data" in e.value.report["interrupted"]


def test_train_section_hands_back_its_finished_stages_when_a_later_one_fails(tmp_path, monkeypatch):
    """bench_train.bench: a failure in a later stage raises benchlib.Interrupted carrying the
    section of the stages done; a failure in the first stage is raised as it is."""
    import bench_train as B

    done = {"stage": "pretrain", "seq_len": 8, "results": [], "comparisons": []}

    def run_stage(stage, *a):
        if stage == "sft":
            raise MemoryError("sft: out of memory")
        return done

    monkeypatch.setattr(B, "run_stage", run_stage)
    with pytest.raises(BL.Interrupted) as e:
        B.bench("min", tmp_path)
    assert e.value.partial["results"]["stages"] == [done] and "out of memory" in str(e.value)
    assert BL.check_section("train", e.value.partial) == []
    monkeypatch.setattr(B, "run_stage", lambda stage, *a: (_ for _ in ()).throw(MemoryError("first")))
    with pytest.raises(MemoryError, match="first"):
        B.bench("min", tmp_path)
