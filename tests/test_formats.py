"""Record formats users bring: the same conversations written as Alpaca, ShareGPT, OpenAI
messages, TRL (standard and conversational, incl. chosen/rejected that repeat the prompt) and
LLaMA-Factory dataset_info.json entries give byte-identical shards; .txt is a document per
line; bad mappings and records are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import prep

from bumblefast.config import PrepConfig, UserError
from bumblefast.prep.records import RecordError, dpo_pair, sft_messages
from bumblefast.shards.manifest import MANIFEST_NAME
from bumblefast.shards.schema import ERRORS_NAME

pytestmark = pytest.mark.usefixtures("clean_shm")


def shard_files(out: Path) -> dict[str, bytes]:
    """The MDS files (shards + index.json); the manifest names the inputs, so it differs."""
    files = {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST_NAME, ERRORS_NAME)
    }
    assert "index.json" in files and any(Path(n).name.startswith("shard.") for n in files)
    return files


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def write_jsonl(path: Path, recs) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path


# ---- sft: one set of conversations, every format ---------------------------------------------
SYS, H_U, H_A, Q1, A1 = "Be brief.", "hi", "hello", "Add\n2 and 3", "5"
Q2, A2 = "Capital of France?", "Paris."


def oai(role, content):
    return {"role": role, "content": content}


def sg(role, value):
    return {"from": role, "value": value}


SFT_FORMATS = {
    "alpaca": [
        {
            "system": SYS,
            "history": [[H_U, H_A]],
            "instruction": "Add",
            "input": "2 and 3",
            "output": A1,
        },
        {"instruction": Q2, "input": "", "output": A2},
    ],
    "sharegpt": [
        {
            "system": SYS,
            "conversations": [sg("human", H_U), sg("gpt", H_A), sg("human", Q1), sg("gpt", A1)],
        },
        {"conversations": [sg("human", Q2), sg("gpt", A2)]},
    ],
    "openai": [
        {
            "messages": [
                oai("system", SYS),
                oai("user", H_U),
                oai("assistant", H_A),
                oai("user", Q1),
                oai("assistant", A1),
            ]
        },
        {"messages": [oai("user", Q2), oai("assistant", A2)]},
    ],
    "trl": [  # conversational prompt/completion, then the standard (string) form
        {
            "prompt": [
                oai("system", SYS),
                oai("user", H_U),
                oai("assistant", H_A),
                oai("user", Q1),
            ],
            "completion": [oai("assistant", A1)],
        },
        {"prompt": Q2, "completion": A2},
    ],
}


def test_sft_formats_give_identical_shards(demo_tokenizer_dir, tmp_path):
    shards = {}
    for name, recs in SFT_FORMATS.items():
        src = write_jsonl(tmp_path / f"{name}.jsonl", recs)
        m = prep(demo_tokenizer_dir, tmp_path / f"out_{name}", "sft", [src])
        assert {k: v for k, v in m["records"].items() if k != "by_file"} == {
            "read": 2,
            "written": 2,
            "skipped": 0,
            "skipped_by_reason": {},
            "truncated": 0,
        }, name
        shards[name] = shard_files(tmp_path / f"out_{name}")
    for name in SFT_FORMATS:
        assert shards[name] == shards["alpaca"], name
    # and they hold what the chat template renders for the conversation (not just "the same")
    msgs, _ = sft_messages(SFT_FORMATS["openai"][0])
    assert msgs == SFT_FORMATS["openai"][0]["messages"]


# ---- dpo ------------------------------------------------------------------------------------------
C1, R1, C2, R2 = "5", "6", "Paris.", "Rome."
DPO_FORMATS = {
    "alpaca": [
        {"system": SYS, "instruction": "Add", "input": "2 and 3", "chosen": C1, "rejected": R1},
        {"instruction": Q2, "chosen": C2, "rejected": R2},
    ],
    "sharegpt": [
        {
            "system": SYS,
            "conversations": [sg("human", Q1)],
            "chosen": sg("gpt", C1),
            "rejected": sg("gpt", R1),
        },
        {"conversations": [sg("human", Q2)], "chosen": sg("gpt", C2), "rejected": sg("gpt", R2)},
    ],
    "openai": [
        {
            "messages": [oai("system", SYS), oai("user", Q1)],
            "chosen": oai("assistant", C1),
            "rejected": oai("assistant", R1),
        },
        {
            "messages": [oai("user", Q2)],
            "chosen": oai("assistant", C2),
            "rejected": oai("assistant", R2),
        },
    ],
    "trl_explicit": [  # conversational with an explicit prompt, then the standard (string) form
        {
            "prompt": [oai("system", SYS), oai("user", Q1)],
            "chosen": [oai("assistant", C1)],
            "rejected": [oai("assistant", R1)],
        },
        {"prompt": Q2, "chosen": C2, "rejected": R2},
    ],
    "trl_implicit": [  # chosen/rejected repeat the prompt; the second as UltraFeedback-binarized
        {
            "chosen": [oai("system", SYS), oai("user", Q1), oai("assistant", C1)],
            "rejected": [oai("system", SYS), oai("user", Q1), oai("assistant", R1)],
        },
        {
            "prompt": Q2,
            "prompt_id": "x1",
            "score_chosen": 8.0,
            "score_rejected": 3.0,
            "chosen": [oai("user", Q2), oai("assistant", C2)],
            "rejected": [oai("user", Q2), oai("assistant", R2)],
        },
    ],
}


def test_dpo_formats_give_identical_shards(demo_tokenizer_dir, tmp_path):
    shards = {}
    for name, recs in DPO_FORMATS.items():
        src = write_jsonl(tmp_path / f"{name}.jsonl", recs)
        m = prep(demo_tokenizer_dir, tmp_path / f"out_{name}", "dpo", [src])
        assert (m["records"]["read"], m["records"]["written"]) == (2, 2), name
        shards[name] = shard_files(tmp_path / f"out_{name}")
    for name in DPO_FORMATS:
        assert shards[name] == shards["alpaca"], name


def test_implicit_prompt_is_the_common_prefix():
    rec = DPO_FORMATS["trl_implicit"][0]
    prompt, chosen, rejected, tools = dpo_pair(rec)
    assert prompt == rec["chosen"][:2] and chosen == oai("assistant", C1) and rejected == oai("assistant", R1)
    multi = {
        "chosen": [
            oai("user", "a"),
            oai("assistant", "b"),
            oai("user", "c"),
            oai("assistant", "d"),
        ],
        "rejected": [
            oai("user", "a"),
            oai("assistant", "b"),
            oai("user", "c"),
            oai("assistant", "e"),
        ],
    }
    prompt, chosen, rejected, _ = dpo_pair(multi)  # multi-turn: the shared turns are the prompt
    assert len(prompt) == 3 and (chosen["content"], rejected["content"]) == ("d", "e")
    same = {
        "chosen": [oai("user", "a"), oai("assistant", "b")],
        "rejected": [oai("user", "a"), oai("assistant", "b")],
    }
    with pytest.raises(RecordError, match="no differing reply"):
        dpo_pair(same)
    longer = {
        "chosen": [
            oai("user", "a"),
            oai("assistant", "b"),
            oai("user", "c"),
            oai("assistant", "d"),
        ],
        "rejected": [oai("user", "a"), oai("assistant", "x")],
    }
    with pytest.raises(RecordError, match="'chosen' has 3 turns after the prompt"):
        dpo_pair(longer)


# ---- LLaMA-Factory dataset_info.json ----------------------------------------------------------
def llamafactory_dir(tmp_path: Path) -> Path:
    """dataset_info.json entries shaped as LLaMA-Factory's own alpaca_en_demo / dpo_en_demo, plus
    custom columns and OpenAI-style tags for the same conversations."""
    d = tmp_path / "data"
    d.mkdir()
    # as LLaMA-Factory's demo files: no system/history columns (unmapped ones are not read)
    write_json(
        d / "alpaca_en_demo.json",
        [
            {"instruction": "Add", "input": "2 and 3", "output": A1},
            {"instruction": Q2, "input": "", "output": A2},
        ],
    )
    write_json(
        d / "dpo_en_demo.json",
        [{k: v for k, v in r.items() if k != "system"} for r in DPO_FORMATS["sharegpt"]],
    )
    write_jsonl(
        d / "qa.jsonl",
        [
            {
                "q": r["instruction"],
                "ctx": r.get("input"),
                "a": r["output"],
                "sys": r.get("system"),
                "hist": r.get("history"),
            }
            for r in SFT_FORMATS["alpaca"]
        ],
    )
    write_jsonl(d / "chat.jsonl", [{"turns": r["messages"]} for r in SFT_FORMATS["openai"]])
    write_jsonl(
        d / "pairs.jsonl",
        [
            {
                "question": r["instruction"] + ("\n" + r["input"] if r.get("input") else ""),
                "good": r["chosen"],
                "bad": r["rejected"],
                "sys": r.get("system"),
            }
            for r in DPO_FORMATS["alpaca"]
        ],
    )
    info = {
        "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
        "dpo_en_demo": {
            "file_name": "dpo_en_demo.json",
            "ranking": True,
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
        },
        "qa": {
            "file_name": "qa.jsonl",
            "columns": {
                "prompt": "q",
                "query": "ctx",
                "response": "a",
                "system": "sys",
                "history": "hist",
            },
        },
        "chat": {
            "file_name": "chat.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "turns"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        },
        "pairs": {
            "file_name": "pairs.jsonl",
            "ranking": True,
            "columns": {"prompt": "question", "chosen": "good", "rejected": "bad", "system": "sys"},
        },
        "remote": {"hf_hub_url": "llamafactory/alpaca_en"},
    }
    write_json(d / "dataset_info.json", info)
    return d


def test_dataset_info_entries_read_like_the_formats(demo_tokenizer_dir, tmp_path):
    from bumblefast.prep.cli import main as prep_main

    d = llamafactory_dir(tmp_path)
    ref_sft = prep(
        demo_tokenizer_dir,
        tmp_path / "ref_sft",
        "sft",
        [write_jsonl(tmp_path / "s.jsonl", SFT_FORMATS["alpaca"])],
    )
    ref_dpo = prep(
        demo_tokenizer_dir,
        tmp_path / "ref_dpo",
        "dpo",
        [write_jsonl(tmp_path / "d.jsonl", DPO_FORMATS["alpaca"])],
    )
    assert ref_sft["records"]["written"] == ref_dpo["records"]["written"] == 2
    prep(demo_tokenizer_dir, tmp_path / "auto_alpaca", "sft", [d / "alpaca_en_demo.json"])  # format detected
    prep(demo_tokenizer_dir, tmp_path / "auto_dpo", "dpo", [d / "dpo_en_demo.json"])
    for stage, name, ref in (
        ("sft", "alpaca_en_demo", "auto_alpaca"),
        ("sft", "qa", "ref_sft"),
        ("sft", "chat", "ref_sft"),
        ("dpo", "dpo_en_demo", "auto_dpo"),
        ("dpo", "pairs", "ref_dpo"),
    ):
        out = tmp_path / f"lf_{name}"
        rc = prep_main(
            [
                "--stage",
                stage,
                "--dataset_info",
                str(d / "dataset_info.json"),
                "--dataset",
                name,
                "--tokenizer_name_or_path",
                str(demo_tokenizer_dir),
                "--seq_len",
                "256",
                "--output_dir",
                str(out),
            ]
        )
        assert rc == 0, name
        assert shard_files(out) == shard_files(tmp_path / ref), name
    # several entries at once (the folder works as --dataset_info too), in the order named
    m = prep(
        demo_tokenizer_dir,
        tmp_path / "two",
        "sft",
        dataset_info=str(d),
        dataset=["alpaca_en_demo", "chat"],
    )
    assert m["records"]["written"] == 4 and list(m["prep"]["datasets"]) == [
        "alpaca_en_demo",
        "chat",
    ]


@pytest.mark.parametrize(
    "entry, stage, message",
    [
        ({"formatting": "alpaca"}, "sft", "dataset 'x': missing key 'file_name'"),
        ({"hf_hub_url": "a/b"}, "sft", "'hf_hub_url' is not fetched by prep"),
        (
            {"file_name": "f.json", "formatting": "openai"},
            "sft",
            "'formatting' must be alpaca or sharegpt",
        ),
        ({"file_name": "f.json", "columns": {"promt": "q"}}, "sft", "unknown key columns.promt"),
        (
            {"file_name": "f.json", "columns": {"messages": "c"}},
            "sft",
            "unknown key columns.messages",
        ),
        (
            {"file_name": "f.json", "formatting": "sharegpt", "tags": {"role": "r"}},
            "sft",
            "unknown key tags.role",
        ),
        (
            {"file_name": "f.json", "columns": {"images": "img"}},
            "sft",
            "columns.images: multimodal",
        ),
        (
            {"file_name": "f.json", "columns": {"prompt": 3}},
            "sft",
            "columns.prompt must be a non-empty string",
        ),
        ({"file_name": "f.json"}, "dpo", "--stage dpo needs a preference set"),
        ({"file_name": "f.json", "ranking": True}, "sft", "'ranking' is true"),
        ({"file_name": "missing.json"}, "sft", "file_name 'missing.json' not found"),
        ({"file_name": "f.json", "load_from": "x"}, "sft", "unknown key 'load_from'"),
    ],
)
def test_dataset_info_errors_name_the_key(tmp_path, entry, stage, message):
    from bumblefast.prep.dataset_info import load_dataset_info

    write_json(tmp_path / "f.json", [])
    write_json(tmp_path / "dataset_info.json", {"x": entry})
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_dataset_info(str(tmp_path / "dataset_info.json"), ["x"], stage)


def test_dataset_info_unknown_name_lists_the_entries(tmp_path):
    from bumblefast.prep.dataset_info import load_dataset_info

    d = llamafactory_dir(tmp_path)
    with pytest.raises(UserError, match=r"'alpaca_demo' is not in .* \(has: alpaca_en_demo, dpo_en_demo"):
        load_dataset_info(str(d / "dataset_info.json"), ["alpaca_demo"], "sft")
    with pytest.raises(UserError, match="'remote': 'hf_hub_url' is not fetched"):
        load_dataset_info(str(d / "dataset_info.json"), ["remote"], "sft")
    with pytest.raises(UserError, match="dataset: needs --dataset_info"):
        from bumblefast.config import build_config

        build_config(PrepConfig, {}, {"dataset": "a", "output_dir": "o"})


def test_dataset_info_bad_records_are_skipped_naming_the_column(demo_tokenizer_dir, tmp_path):
    d = llamafactory_dir(tmp_path)
    write_jsonl(d / "qa.jsonl", [{"q": "Hi", "a": "Hello"}, {"q": "Hi"}, {"q": "Hi", "a": 3}])
    write_jsonl(
        d / "chat.jsonl",
        [
            {"turns": [oai("user", "a"), oai("assistant", "b")]},
            {"turns": [oai("human", "a"), oai("assistant", "b")]},
            {"turns": [{"role": "user"}, oai("assistant", "b")]},
        ],
    )
    m = prep(demo_tokenizer_dir, tmp_path / "o", "sft", dataset_info=str(d), dataset=["qa", "chat"])
    assert m["records"]["read"] == 6 and m["records"]["written"] == 2
    assert m["records"]["skipped_by_reason"] == {
        "missing_field": 2,
        "unknown_role": 1,
        "wrong_type": 1,
    }
    errors = [json.loads(x) for x in (tmp_path / "o" / ERRORS_NAME).read_text().splitlines()]
    messages = {e["where"].rsplit("/", 1)[1]: e["message"] for e in errors}
    assert messages["qa.jsonl:2"] == "missing field 'a' (columns.response of dataset 'qa')"
    assert messages["qa.jsonl:3"] == "field 'a' (columns.response) must be str, got int"
    assert messages["chat.jsonl:2"].startswith("turns[0] has role 'human', not one of the dataset's tags")
    assert messages["chat.jsonl:3"] == "turns[0] has no 'content' (tags.content_tag)"


def test_dataset_info_pretrain_text_column(demo_tokenizer_dir, tmp_path):
    """LLaMA-Factory's pretrain entries (c4_demo: columns.prompt = "text") and any other column."""
    docs = ["first document", "second one", "third"]
    write_jsonl(tmp_path / "c4.jsonl", [{"content": t} for t in docs])
    write_jsonl(tmp_path / "plain.jsonl", [{"text": t} for t in docs])
    write_json(
        tmp_path / "dataset_info.json",
        {"c4": {"file_name": "c4.jsonl", "columns": {"prompt": "content"}}},
    )
    prep(
        demo_tokenizer_dir,
        tmp_path / "a",
        "pretrain",
        seq_len=8,
        dataset_info=str(tmp_path),
        dataset=["c4"],
    )
    prep(demo_tokenizer_dir, tmp_path / "b", "pretrain", [tmp_path / "plain.jsonl"], seq_len=8)
    assert shard_files(tmp_path / "a") == shard_files(tmp_path / "b")


# ---- .txt -------------------------------------------------------------------------------------------
def test_txt_is_a_document_per_line(demo_tokenizer_dir, tmp_path):
    docs = [
        "The first line.",
        "  indented second line",
        "third, after a blank line",
        "last without newline",
    ]
    (tmp_path / "c.txt").write_bytes(f"{docs[0]}\r\n{docs[1]}\n\n   \n{docs[2]}\n{docs[3]}".encode())
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in docs])
    m = prep(demo_tokenizer_dir, tmp_path / "t", "pretrain", [tmp_path / "c.txt"], seq_len=16)
    prep(demo_tokenizer_dir, tmp_path / "j", "pretrain", [tmp_path / "c.jsonl"], seq_len=16)
    assert m["records"]["read"] == m["records"]["written"] == 4
    assert shard_files(tmp_path / "t") == shard_files(tmp_path / "j")
    # reference: the Hugging Face `text` loader's lines (it keeps blank lines as empty records)
    from datasets import load_dataset

    hf = [r["text"] for r in load_dataset("text", data_files=str(tmp_path / "c.txt"), split="train")]
    assert [t for t in hf if t.strip()] == docs
    sft = write_jsonl(tmp_path / "sft.jsonl", SFT_FORMATS["alpaca"])
    m = prep(demo_tokenizer_dir, tmp_path / "s", "sft", [tmp_path / "c.txt", sft])
    assert m["records"]["skipped_by_reason"].get("not_an_object") == 4  # a .txt line is no chat record
