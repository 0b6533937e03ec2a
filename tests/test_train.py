"""The trainer end to end on CPU: ZeRO stages on 2 gloo processes, exact resume after
SIGKILL, loss normalisation across accumulation, SFT loss masking, export, plots.
Single-process runs go through `bumblefast train` in this process (train_hooks.train_in_process,
no ~8 s of imports per run); child processes only for 2 ranks and SIGKILL."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import DEMO, ROOT, TINY, prep, subprocess_env, train_command
from train_hooks import NAN_ENV, TRACE_ENV, InjectNaN, run_here

pytestmark = pytest.mark.slow


env = subprocess_env


def train_cmd(
    out: Path, data: Path, tok: Path, *extra: str, nproc: int = 1, stage: str = "pretrain", hooks: bool = False
) -> list[str]:
    """This file's `bumblefast train` command line (helpers.train_command); `hooks`: the CLI
    with tests/train_hooks.py's callbacks. A --model_name_or_path in `extra` replaces the preset."""
    extra = list(extra)
    model = TINY
    if "--model_name_or_path" in extra:
        i = extra.index("--model_name_or_path")
        model = extra[i + 1]
        del extra[i : i + 2]
    return train_command(
        stage,
        *extra,
        nproc=nproc,
        hooks=hooks,
        model_name_or_path=model,
        tokenizer_name_or_path=tok,
        dataset_path=data,
        output_dir=out,
        cutoff_len=64,
        train_micro_batch_size_per_gpu=2,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        use_tensorboard="true",
    )


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=ROOT, env=kw.pop("env", env()), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in json.loads((out / "training_metrics.json").read_text())}


def metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in json.loads((out / "training_metrics.json").read_text())}


@pytest.fixture(scope="module")
def data(tmp_path_factory, demo_tokenizer_dir):
    """Small pretrain and sft shard sets prepped from the demo data."""

    root = tmp_path_factory.mktemp("data")
    docs = json.loads((DEMO / "pretrain.json").read_text())[:120]
    raw = root / "pretrain.jsonl"
    raw.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    sft = json.loads((DEMO / "sft_alpaca.json").read_text())[:48]
    (root / "sft.json").write_text(json.dumps(sft, ensure_ascii=False))
    for stage, src in (("pretrain", raw), ("sft", root / "sft.json")):
        prep(demo_tokenizer_dir, root / stage, stage, [src], seq_len=64)
    return {
        "root": root,
        "raw_pretrain": raw,
        "pretrain": root / "pretrain",
        "sft": root / "sft",
        "tok": demo_tokenizer_dir,
    }


@pytest.fixture(scope="module")
def zero_runs(data, tmp_path_factory):
    """The same 4 steps on 2 processes with ZeRO-0, -1, -2 and -3 (a checkpoint after each step)."""
    root = tmp_path_factory.mktemp("zero")
    outs = {}
    for stage in (0, 1, 2, 3):
        out = root / f"z{stage}"
        run(
            train_cmd(
                out,
                data["pretrain"],
                data["tok"],
                "--max_steps",
                "4",
                "--save_steps",
                "1",
                "--save_total_limit",
                "0",
                "--deepspeed_config_path",
                str(ROOT / f"configs/deepspeed/ds_z{stage}.json"),
                nproc=2,
            )
        )
        outs[stage] = out
    return outs


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_two_processes_loss_falls(zero_runs, stage):
    loss = losses(zero_runs[stage])
    assert sorted(loss) == [1, 2, 3, 4]
    assert loss[4] < loss[1] - 0.5, loss


def test_zero3_export_matches_zero0(zero_runs):
    ids = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = hf_logits(zero_runs[0], ids)
    for stage in (1, 2, 3):
        got = hf_logits(zero_runs[stage], ids)
        # Adam turns fp32 reduction-order noise (sharded vs whole gradients) on weights whose
        # gradient is ~0 into updates of up to +-lr, so after 4 steps single logits move by a
        # few 1e-3 (how many depends on the data); a wrong update would move them all.
        diff = (got - ref).abs()
        assert diff.mean() < 1e-4, float(diff.mean())
        assert (diff > 5e-4).float().mean() < 0.05
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-2)
    # the same losses step by step (fp32; only the reduction order differs, which Adam amplifies)
    for stage in (1, 2, 3):
        for step, value in losses(zero_runs[0]).items():
            assert losses(zero_runs[stage])[step] == pytest.approx(value, rel=1e-4)


def test_zero_to_fp32_reads_our_checkpoints(zero_runs):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    exported = load_file(zero_runs[3] / "model.safetensors")
    state = get_fp32_state_dict_from_zero_checkpoint(str(zero_runs[3] / "checkpoints"), tag="step-4")
    state = {k.removeprefix("model."): v for k, v in state.items()}
    for key, value in exported.items():
        torch.testing.assert_close(state[key], value)


def test_resume_after_sigkill_is_bit_exact(data, tmp_path):
    """A trains one epoch straight; B is SIGKILLed after its mid-epoch checkpoint and resumed."""
    rows = json.loads((data["pretrain"] / "bumblefast.json").read_text())["rows"]  # same input as the raw file
    n_steps = rows // 4  # micro batch 2 x accumulation 2: one epoch, no sample twice
    assert n_steps >= 6, rows
    half = n_steps // 2
    steps = str(n_steps)
    a, b = tmp_path / "a", tmp_path / "b"
    cache = tmp_path / "cache"
    out_a = run(
        train_cmd(a, data["raw_pretrain"], data["tok"], "--max_steps", steps, hooks=True),
        env=env(**{TRACE_ENV: tmp_path / "a.jsonl"}, BUMBLEFAST_CACHE=cache),
    )
    assert "is raw data: running `bumblefast prep` once" in out_a.stdout

    cmd_b = train_cmd(b, data["raw_pretrain"], data["tok"], "--max_steps", steps, "--save_steps", str(half), hooks=True)
    proc = subprocess.Popen(
        cmd_b,
        cwd=ROOT,
        env=env(**{TRACE_ENV: tmp_path / "b1.jsonl"}, BUMBLEFAST_CACHE=cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while not (b / "checkpoints" / f"step-{half}" / "COMPLETE").exists():
        assert proc.poll() is None and time.time() < deadline, "run B ended before its checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (b / "model.safetensors").exists()  # killed mid-run, before the end
    out_b = run(cmd_b + ["--resume", "auto"], env=env(**{TRACE_ENV: tmp_path / "b2.jsonl"}, BUMBLEFAST_CACHE=cache))
    assert "using the prepped cache" in out_b.stdout
    assert "resumed from" in out_b.stdout and f"step-{half}" in out_b.stdout

    la, lb = losses(a), losses(b)
    assert sorted(lb) == list(range(1, n_steps + 1))
    for step in range(half + 1, n_steps + 1):
        assert lb[step] == la[step], (step, lb[step], la[step])  # bit for bit

    def trace(name):
        return [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]

    seen_a = [i for r in trace("a.jsonl") for i in r["sample_ids"]]
    seen_b = [i for r in trace("b1.jsonl") if r["step"] <= half for i in r["sample_ids"]]
    seen_b += [i for r in trace("b2.jsonl") for i in r["sample_ids"]]
    assert seen_b == seen_a  # the same samples in the same order
    assert len(set(seen_a)) == len(seen_a) == 4 * n_steps  # each sample exactly once in the epoch
    assert set(seen_a) <= set(range(rows)) and len(seen_a) > rows - 4  # (a short tail is dropped)


def test_resume_skips_a_damaged_checkpoint(data, tmp_path, one_rank):
    out = tmp_path / "run"
    run_here(
        train_cmd(
            out, data["pretrain"], data["tok"], "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "0"
        )
    )
    (out / "checkpoints" / "step-4" / "trainer.json").write_text("{}")  # size no longer matches
    res = run_here(train_cmd(out, data["pretrain"], data["tok"], "--max_steps", "4", "--resume", "auto"))
    assert "step-4 is damaged" in res.stdout and "resumed from" in res.stdout and "step-2" in res.stdout


def test_grad_accumulation_equals_big_micro_batch(data, tmp_path, one_rank):
    """4 x micro batch 1 and 1 x micro batch 4 on variable-length packed sft rows: same loss,
    same gradient norm, same weights after the step."""
    base = tmp_path / "pre"
    run_here(train_cmd(base, data["pretrain"], data["tok"], "--max_steps", "1"))
    outs = {}
    for mb, ga in ((1, 4), (4, 1)):
        out = tmp_path / f"mb{mb}"
        run_here(
            train_cmd(
                out,
                data["sft"],
                data["tok"],
                "--model_name_or_path",
                str(base),
                "--max_steps",
                "1",
                "--train_micro_batch_size_per_gpu",
                str(mb),
                "--gradient_accumulation_steps",
                str(ga),
                "--shuffle",
                "false",
                stage="sft",
            )
        )
        outs[mb] = out
    m1, m4 = metrics(outs[1])[1], metrics(outs[4])[1]
    assert m1["loss"] == pytest.approx(m4["loss"], rel=1e-6)
    assert m1["grad_norm"] == pytest.approx(m4["grad_norm"], rel=1e-5)
    from safetensors.torch import load_file

    w1, w4 = load_file(outs[1] / "model.safetensors"), load_file(outs[4] / "model.safetensors")
    # Adam divides by sqrt(v), so an element whose gradient is ~0 turns fp32 reduction-order
    # noise into a visible update difference; a different update would move most elements by
    # ~lr (3e-3). So: all but 0.1% within 1e-6 (0.02% seen), and none beyond the 2 x lr of a
    # flipped update (how many and how far depends on the data: up to 1.0e-4 seen).
    diffs = torch.cat([(w1[k] - w4[k]).abs().flatten() for k in w1])
    assert diffs.max() < 2 * 3e-3
    assert (diffs > 1e-6).float().mean() < 1e-3


def test_sft_loss_is_on_assistant_tokens_only(data, tmp_path, demo_tokenizer_dir):
    """The objective on one hand-built SFT record equals cross-entropy computed by
    transformers' Qwen2 over exactly the assistant reply and its <|im_end|>."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from bumblefast.model import Bumblebee
    from bumblefast.shards.reader import build_loader
    from bumblefast.train.objectives import LMObjective

    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    rec = {"instruction": "What is 2 + 3?", "input": "", "output": "2 + 3 = 5"}
    (tmp_path / "one.json").write_text(json.dumps([rec]))
    prep(demo_tokenizer_dir, tmp_path / "shards", "sft", [tmp_path / "one.json"], seq_len=64)
    batch = next(iter(build_loader(str(tmp_path / "shards"), batch_size=1, shuffle=False)))

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": rec["instruction"]}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tok(rec["output"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    full = prompt_ids + reply_ids + tok("\n", add_special_tokens=False)["input_ids"]
    assert batch.input_ids.tolist() == full

    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(TINY)
    torch.manual_seed(0)
    ours = Bumblebee(cfg, attn_backend="sdpa", kernels="reference").init_weights()
    hf = Qwen2ForCausalLM(cfg)
    hf.load_state_dict(ours.state_dict(), strict=False)
    hf.tie_weights()
    loss_sum, _ = LMObjective(ours)(batch)
    n = LMObjective.count(batch)

    logits = hf(torch.tensor([full]), use_cache=False).logits[0]
    start = len(prompt_ids)  # first target: the first reply token, predicted from position start-1
    targets = torch.tensor(reply_ids)
    expected = torch.nn.functional.cross_entropy(
        logits[start - 1 : start - 1 + len(reply_ids)], targets, reduction="sum"
    )
    assert int(n) == len(reply_ids)
    torch.testing.assert_close(loss_sum, expected, rtol=1e-5, atol=1e-5)


def test_non_finite_loss_stops_with_sample_ids_and_checkpoint(data, tmp_path, one_rank):
    # The loss made NaN at step 4 (lr 1e4 no longer overflows: the closed-form RMSNorm backward
    # of kernels/lean.py keeps the saturated model's loss finite, 6.46)
    out = tmp_path / "nan"
    cmd = train_cmd(out, data["pretrain"], data["tok"], "--max_steps", "6", "--max_skipped_steps", "0")
    res = run_here(cmd, callbacks=[InjectNaN({(4, 0)})], rc=3)
    assert "non-finite" in res.stderr and "sample ids" in res.stderr
    assert "last good state saved in" in res.stderr
    assert (out / "checkpoints" / "latest").is_file()


def checkpoint_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights in a checkpoint: zero_to_fp32 for ZeRO >= 1, the module state for ZeRO-0."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if any(folder.glob("zero_pp_rank_*")):
        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    return torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def same_weights(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def traced(path: Path, step: int, rank: int) -> list[int]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return next(r["sample_ids"] for r in rows if r["step"] == step and r["rank"] == rank)


def named_samples(line: str) -> dict[int, list[int]]:
    """{rank: sample ids} as a non-finite message names them."""
    return {
        int(r): [int(i) for i in ids.split(",")]
        for ids, r in re.findall(r"sample ids \[([\d, ]+)\] on rank (\d)", line)
    }


def line_with(text: str, needle: str) -> str:
    return next(line for line in text.splitlines() if needle in line)


@pytest.mark.parametrize("stage", [2, 3])
def test_nan_on_one_rank_is_skipped_then_stops_without_hang(data, zero_runs, tmp_path, stage):
    """Only rank 1's batches give NaN losses, at steps 2 and 3, with max_skipped_steps 1: step 2
    is skipped, step 3 stops the run. Both processes exit (no rank is left inside a collective),
    the saved state holds bit for bit the weights after step 1 of the same run without NaN, and
    the messages name exactly rank 1's samples of those steps (as the sample trace saw them)."""
    out, trace = tmp_path / "nan", tmp_path / "trace.jsonl"
    cmd = train_cmd(
        out,
        data["pretrain"],
        data["tok"],
        "--max_steps",
        "4",
        "--max_skipped_steps",
        "1",
        "--deepspeed_config_path",
        str(ROOT / f"configs/deepspeed/ds_z{stage}.json"),
        nproc=2,
        hooks=True,
    )
    res = subprocess.run(
        cmd,
        cwd=ROOT,
        env=env(**{NAN_ENV: "2:1,3:1", TRACE_ENV: trace}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode != 0, res.stderr[-3000:]
    skipped = line_with(res.stderr, "non-finite loss at step 2")
    assert "update skipped (1 of max_skipped_steps=1)" in skipped
    assert named_samples(skipped) == {1: traced(trace, 2, 1)}
    stop = line_with(res.stderr, "non-finite loss at step 3")
    assert named_samples(stop) == {1: traced(trace, 3, 1)}
    assert "last good state saved in" in stop and str(out / "checkpoints" / "step-2") in stop
    saved = out / "checkpoints" / "step-2"
    state = json.loads((saved / "trainer.json").read_text())
    assert state["step"] == 2 and state["skipped_steps"] == 1
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-2"]
    clean = zero_runs[stage] / "checkpoints"
    assert same_weights(checkpoint_weights(saved), checkpoint_weights(clean / "step-1"))
    assert not same_weights(checkpoint_weights(clean / "step-1"), checkpoint_weights(clean / "step-2"))
    assert losses(out)[1] == losses(zero_runs[stage])[1]


def test_nan_step_is_skipped_and_training_goes_on(data, tmp_path, one_rank):
    """ZeRO-0 fp32 (the trainer's own gradient check): a NaN step changes no weight and does
    not advance the learning-rate schedule; the next step trains; the run succeeds."""
    out = tmp_path / "skip"
    res = run_here(
        train_cmd(
            out,
            data["pretrain"],
            data["tok"],
            "--max_steps",
            "3",
            "--save_steps",
            "1",
            "--save_total_limit",
            "0",
            "--lr_scheduler_type",
            "linear",
        ),
        callbacks=[InjectNaN({(2, 0)})],
    )
    assert "non-finite loss at step 2" in res.stderr and "update skipped (1 of max_skipped_steps=3)" in res.stderr
    w1, w2, w3 = (checkpoint_weights(out / "checkpoints" / f"step-{i}") for i in (1, 2, 3))
    assert same_weights(w1, w2) and not same_weights(w2, w3)
    m = metrics(out)
    assert m[2]["lr"] == m[1]["lr"] > m[3]["lr"] and m[3]["skipped_steps"] == 1
    assert m[1]["loss"] > 0 and m[3]["loss"] > 0


def test_plot_writes_pngs_from_tensorboard(zero_runs, tmp_path):
    from bumblefast.cli import main

    assert main(["plot", str(zero_runs[2]), "--out", str(tmp_path)]) == 0
    for name in ("loss.png", "learning_rate.png", "grad_norm.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_continue_pretrain_and_lora_sft_from_a_checkpoint(data, tmp_path, one_rank):
    """continue_pretrain starts from a HF checkpoint (not random init); LoRA SFT writes a PEFT
    adapter that peft loads on transformers' model."""
    from safetensors.torch import load_file

    base = tmp_path / "pre"
    run_here(train_cmd(base, data["pretrain"], data["tok"], "--max_steps", "2"))
    cont = tmp_path / "cont"
    run_here(
        train_cmd(
            cont,
            data["pretrain"],
            data["tok"],
            "--model_name_or_path",
            str(base),
            "--max_steps",
            "1",
            "--learning_rate",
            "1e-9",
            stage="continue_pretrain",
        )
    )
    before, after = load_file(base / "model.safetensors"), load_file(cont / "model.safetensors")
    for key in before:  # a tiny step from the checkpoint, not a fresh random model
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6)
    assert metrics(cont)[1]["loss"] < metrics(base)[1]["loss"]  # starts where the checkpoint left off

    lora = tmp_path / "lora"
    run_here(
        train_cmd(
            lora,
            data["sft"],
            data["tok"],
            "--model_name_or_path",
            str(base),
            "--max_steps",
            "2",
            "--finetuning_type",
            "lora",
            "--lora_rank",
            "4",
            "--lora_alpha",
            "8",
            stage="sft",
        )
    )
    assert (lora / "adapter_config.json").is_file() and not (lora / "model.safetensors").exists()
    targets = json.loads((lora / "adapter_config.json").read_text())["target_modules"]
    assert targets == sorted(targets) and len(targets) > 1  # peft's set, in an order not hash-seeded
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), lora)
    assert any("lora_A" in n for n, _ in model.named_parameters())
