"""Prep as tasks: the cut reads every record once at its exact file:line; the output depends on
the input and the task size only (1 worker, 2 workers, 2 nodes + merge: the same bytes); a
worker killed mid-task and a rerun give the same bytes; a rerun with other settings is refused
naming them; launcher environment variables pick the node."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from helpers import DEMO

from bumblefast.config import PrepConfig, UserError
from bumblefast.prep.cli import main as prep_main
from bumblefast.prep.cli import parse_prep_args
from bumblefast.prep.launch import nodes_from_env
from bumblefast.prep.run import run_prep
from bumblefast.prep.sources import iter_records
from bumblefast.prep.split import cut_tasks, iter_pieces

BAD_JSONL_LINES = {7: "malformed_json", 300: "missing_field", 1234: "malformed_json"}  # 1-based


pytestmark = pytest.mark.usefixtures("clean_shm")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    """A jsonl with bad and blank lines, a .txt, a parquet of 5 row groups and a JSON array."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("inputs")
    texts = [r["text"] for r in json.loads((DEMO / "pretrain.json").read_text(encoding="utf-8"))]
    lines = []
    for i in range(1, 1501):
        bad = BAD_JSONL_LINES.get(i)
        if bad == "malformed_json":
            lines.append('{"text": "unterminated')
        elif bad == "missing_field":
            lines.append(json.dumps({"body": "x"}))
        elif i % 97 == 0:
            lines.append("   ")  # blank: not a record
        else:
            lines.append(json.dumps({"text": texts[i % len(texts)]}, ensure_ascii=False))
    big = d / "a.jsonl"
    big.write_text("\n".join(lines) + "\n", encoding="utf-8")
    txt = d / "b.txt"
    txt.write_text(
        "".join(t.replace("\n", " ") + "\n" + ("\n" if i % 5 == 0 else "") for i, t in enumerate(texts[:300]))
    )
    par = d / "c.parquet"
    pq.write_table(pa.table({"text": [texts[(7 * i) % len(texts)] for i in range(500)]}), par, row_group_size=100)
    arr = d / "d.json"
    shutil.copy(DEMO / "pretrain_test.json", arr)
    return [big, txt, par, arr]


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def prep(tok_dir, out, files, **kw):
    kw = {"seq_len": 128, "task_size": "20kb", "shard_size_limit": "16kb", **kw}
    cfg = PrepConfig(
        stage="pretrain",
        input=[str(f) for f in files],
        tokenizer_name_or_path=str(tok_dir),
        output_dir=str(out),
        **kw,
    )
    return run_prep(cfg, progress=False)


# ---- the cut ---------------------------------------------------------------------------------
def test_cut_tasks_reads_every_record_once_in_order(inputs):
    files = [str(f) for f in inputs]
    whole = [(w, str(r)) for w, r in iter_records(files)]
    for task_bytes in (3000, 40 << 10, 1 << 30):
        tasks = cut_tasks(files, task_bytes)
        got = [(w, str(r)) for t in tasks for w, r in iter_pieces(t.pieces)]
        assert got == whole  # every record once, in order, at its exact file:line
        assert [t.index for t in tasks] == list(range(len(tasks)))
        for t in tasks:  # a task holds at most task_bytes, unless it is one uncuttable piece
            size = sum(p.end - p.start for p in t.pieces if p.unit != "row_groups")
            assert size <= task_bytes or len(t.pieces) == 1
    small = {p.unit for t in cut_tasks(files, 3000) for p in t.pieces}
    assert small == {"bytes", "row_groups", "file"}  # jsonl/txt by bytes, parquet by row groups, array whole
    assert len(cut_tasks(files, 1 << 30)) == 1


# ---- workers and nodes only execute tasks ----------------------------------------------------
def test_output_depends_on_tasks_only_and_every_record_counted(demo_tokenizer_dir, inputs, tmp_path):
    from bumblefast.prep.merge import merge_parts
    from bumblefast.tokenizer import load_tokenizer

    one = prep(demo_tokenizer_dir, tmp_path / "w1", inputs)
    assert one["prep"]["tasks"] >= 6
    prep(demo_tokenizer_dir, tmp_path / "w2", inputs, num_workers=2)
    for r in range(2):
        prep(demo_tokenizer_dir, tmp_path / "nodes", inputs, node_rank=r, num_nodes=2)
    merge_parts(str(tmp_path / "nodes"))
    ref = tree_bytes(tmp_path / "w1")
    assert any("/shard." in n for n in ref) and ref == tree_bytes(tmp_path / "w2") == tree_bytes(tmp_path / "nodes")

    # every record counted once, per file, against counts made without prep's readers
    import pyarrow.parquet as pq

    big, txt, par, arr = inputs
    expect_read = {
        str(big): sum(1 for line in big.read_text().splitlines() if line.strip()),
        str(txt): sum(1 for line in txt.read_text().splitlines() if line.strip()),
        str(par): pq.ParquetFile(par).metadata.num_rows,
        str(arr): len(json.loads(arr.read_text())),
    }
    rec = one["records"]
    assert {f: c["read"] for f, c in rec["by_file"].items()} == expect_read
    assert all(c["read"] == c["written"] + c["skipped"] for c in rec["by_file"].values())
    assert rec["read"] == rec["written"] + rec["skipped"] == sum(expect_read.values())
    assert rec["skipped_by_reason"] == dict(Counter(BAD_JSONL_LINES.values()))
    errors = [json.loads(line) for line in (tmp_path / "w1" / "errors.jsonl").read_text().splitlines()]
    assert [(e["where"], e["reason"]) for e in errors] == [(f"{big}:{n}", r) for n, r in BAD_JSONL_LINES.items()]

    # tokens: the HF tokenizer's count of every good document (+ EOS) = rows + each task's dropped tail
    tok = load_tokenizer(str(demo_tokenizer_dir))
    good = [
        json.loads(line)["text"]
        for n, line in enumerate(big.read_text().splitlines(), 1)
        if line.strip() and n not in BAD_JSONL_LINES
    ]
    good += [line for line in txt.read_text().splitlines() if line.strip()]
    good += pq.read_table(par)["text"].to_pylist() + [r["text"] for r in json.loads(arr.read_text())]
    n_tok = sum(len(ids) + 1 for ids in tok(good, add_special_tokens=False)["input_ids"])
    t = one["tokens"]
    assert t["real"] + t["tail_tokens_dropped"] == n_tok
    assert t["tail_tokens_dropped"] < one["prep"]["tasks"] * 128  # < one row per task edge


def test_worker_killed_mid_task_rerun_is_byte_identical(demo_tokenizer_dir, inputs, tmp_path, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    prep(demo_tokenizer_dir, tmp_path / "ref", inputs)
    out = tmp_path / "out"
    monkeypatch.setenv("BUMBLEFAST_PREP_TEST_KILL_TASK", "3")
    with pytest.raises(BrokenProcessPool):
        prep(demo_tokenizer_dir, out, inputs, num_workers=2)
    monkeypatch.delenv("BUMBLEFAST_PREP_TEST_KILL_TASK")
    work = tmp_path / ".out.tasks" / "tasks"
    assert not out.exists() and (work / "plan.json").is_file()
    assert not (work / "t000003").exists()  # the killed task is not finished
    m = prep(demo_tokenizer_dir, out, inputs, num_workers=2)
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")
    assert m["records"]["read"] == m["records"]["written"] + m["records"]["skipped"]
    assert not any(tmp_path.glob(".*"))


def test_rerun_with_other_settings_is_refused_naming_them(demo_tokenizer_dir, inputs, tmp_path):
    out = tmp_path / "out"
    prep(demo_tokenizer_dir, out, inputs, node_rank=0, num_nodes=2)  # leaves unfinished tasks
    for kw, name in (({"seq_len": 256}, "seq_len"), ({"task_size": "64kb"}, "task_size")):
        with pytest.raises(UserError, match=rf"started with other settings \({name}: .* there, .* now.*delete"):
            prep(demo_tokenizer_dir, out, inputs, **kw)
    other_tok = tmp_path / "tok2"
    shutil.copytree(demo_tokenizer_dir, other_tok)
    cfg = json.loads((other_tok / "tokenizer_config.json").read_text())
    (other_tok / "tokenizer_config.json").write_text(json.dumps(dict(cfg, model_max_length=77)))
    with pytest.raises(UserError, match=r"\(tokenizer: "):
        prep(other_tok, out, inputs)
    # the same settings resume: node 1's tasks, then the join
    prep(demo_tokenizer_dir, out, inputs, node_rank=1, num_nodes=2)
    assert prep_main(["merge", str(out)]) == 0
    assert json.loads((out / "bumblefast.json").read_text())["seq_len"] == 128


# ---- launchers -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "env, expect",
    [
        ({"SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_ID": "5"}, (8, 5, "Slurm job array")),
        (
            {
                "SLURM_ARRAY_TASK_COUNT": "4",
                "SLURM_ARRAY_TASK_ID": "12",
                "SLURM_ARRAY_TASK_MIN": "10",
                "SLURM_NTASKS": "1",
                "SLURM_PROCID": "0",
            },
            (4, 2, "Slurm job array"),
        ),  # fmt: skip
        ({"SLURM_NTASKS": "3", "SLURM_PROCID": "2"}, (3, 2, "Slurm tasks")),
        ({"WORLD_SIZE": "2", "RANK": "1"}, (2, 1, "torchrun")),
        ({"JOB_COMPLETION_INDEX": "6", "BUMBLEFAST_NUM_NODES": "7"}, (7, 6, "Kubernetes")),
        ({"LOCAL_RANK": "0"}, None),
    ],
)
def test_nodes_from_launcher_env(env, expect):
    got = nodes_from_env(env)
    if expect is None:
        assert got is None
    else:
        assert got[:2] == expect[:2] and got[2].startswith(expect[2])


def test_cli_takes_the_node_from_env_unless_given(monkeypatch, capsys):
    base = ["--stage", "pretrain", "--input", "x.jsonl", "--tokenizer", "tok", "--output_dir", "o"]
    for k in ("SLURM_ARRAY_TASK_COUNT", "SLURM_NTASKS", "WORLD_SIZE", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(k, raising=False)
    assert (parse_prep_args(base).num_nodes, parse_prep_args(base).node_rank) == (1, 0)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    cfg = parse_prep_args(base)
    assert (cfg.num_nodes, cfg.node_rank) == (4, 3)
    assert "prep: node 3 of 4 (from Slurm job array" in capsys.readouterr().err
    cfg = parse_prep_args([*base, "--node_rank", "0", "--num_nodes", "1"])  # explicit wins
    assert (cfg.num_nodes, cfg.node_rank) == (1, 0)
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    with pytest.raises(UserError, match="set BUMBLEFAST_NUM_NODES to the Job's completions, or pass --num_nodes"):
        parse_prep_args(base)
    cfg = parse_prep_args([*base, "--num_nodes", "5"])
    assert (cfg.num_nodes, cfg.node_rank) == (5, 2)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "9")
    with pytest.raises(UserError, match="node_rank: must be in"):
        parse_prep_args([*base, "--num_nodes", "5"])
