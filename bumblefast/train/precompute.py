"""`bumblefast precompute-ref`: run the DPO reference model once over dpo shards and write a
new shard set with a `ref_logps` column (float32, one summed log-prob per segment), so DPO
training needs no reference forward at all.

The output manifest records the model and the source dataset:
  ref_logps.model_fingerprint   hash of the model's config and weight files
  ref_logps.source_fingerprint  the source shard set's fingerprint
  fingerprint                   derived from both
and the trainer refuses the column when `--model_name_or_path` is another model or the
derivation does not hold. Runs as one process or under torchrun / deepspeed (each rank
scores every world-th row; rank 0 writes).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch

from bumblefast.config import UserError
from bumblefast.shards.manifest import Manifest


def precompute_ref(
    model_name_or_path: str,
    dataset_path: str,
    output_dir: str,
    batch_size: int = 8,
    attn_backend: str = "auto",
    kernels: str = "auto",
) -> dict:
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from bumblefast.model import Bumblebee
    from bumblefast.shards.collate import collate_rows
    from bumblefast.shards.reader import ShardDataset
    from bumblefast.train import distributed as D
    from bumblefast.train.build import model_fingerprint
    from bumblefast.train.objectives import segment_stats

    src = Manifest.read(dataset_path)
    if src.stage != "dpo":
        raise UserError(f"dataset_path: {dataset_path} holds {src.stage} shards; precompute-ref needs dpo shards")
    if not (Path(model_name_or_path) / "config.json").is_file():
        raise FileNotFoundError(f"model_name_or_path: no config.json in {model_name_or_path}")
    distributed = "RANK" in os.environ
    device = D.init() if distributed else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = D.rank(), D.world_size()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = (
        Bumblebee.from_pretrained(model_name_or_path, torch_dtype=dtype, attn_backend=attn_backend, kernels=kernels)
        .to(device)
        .eval()
    )

    ds = ShardDataset(dataset_path, shuffle=False, batch_size=1)
    mine = list(range(rank, ds.num_samples, world))
    scores: dict[int, list[float]] = {}
    with torch.no_grad():
        for start in tqdm(range(0, len(mine), batch_size), desc="precompute-ref", disable=rank != 0):
            rows = [ds[i] for i in mine[start : start + batch_size]]
            b = collate_rows(rows, "dpo", src.seq_len).to(device)
            logps = segment_stats(model, b)[0].cpu().tolist()
            for row in rows:
                k = len(row["seq_lens"])
                scores[row["sample_id"]], logps = logps[:k], logps[k:]
    if distributed and world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, scores)
        scores = {k: v for part in gathered for k, v in part.items()}
    manifest = None
    if rank == 0:
        manifest = _write(
            ds,
            scores,
            src,
            dataset_path=dataset_path,
            output_dir=output_dir,
            model_path=model_name_or_path,
            model_fp=model_fingerprint(model_name_or_path),
        )
    D.barrier()
    return manifest


def _write(ds, scores, src: Manifest, *, dataset_path, output_dir, model_path, model_fp) -> dict:
    """Rows in their original order plus ref_logps; staged, then renamed into place."""
    import numpy as np
    from streaming import MDSWriter

    from bumblefast.shards.manifest import RefLogps, ref_fingerprint, staged_output
    from bumblefast.shards.schema import PROMPT_COLUMN, columns, is_remote

    if is_remote(str(output_dir)):
        raise UserError(f"output_dir: {output_dir}: precompute-ref writes a local folder (upload it afterwards)")
    final = Path(output_dir)
    if final.resolve() == Path(dataset_path).resolve():
        raise UserError("output_dir: must differ from dataset_path (the source shards stay as they are)")
    cols = columns("dpo", src.tokenizer.vocab_size, ref_logps=True, shared_prompt=PROMPT_COLUMN in src.columns)
    with staged_output(final) as staging:
        with MDSWriter(
            out=str(staging),
            columns=cols,
            compression=src.prep.get("compression") or None,
            hashes=src.prep.get("hashes") or ["xxh64"],
        ) as writer:
            for i in range(ds.num_samples):
                row = ds[i]
                sample = {k: row[k] for k in cols if k != "ref_logps"}
                sample["ref_logps"] = np.asarray(scores[i], dtype=np.float32)
                writer.write(sample)
        manifest = dataclasses.replace(
            src,
            columns=cols,
            ref_logps=RefLogps(str(model_path), model_fp, src.fingerprint, str(dataset_path)),
            fingerprint=ref_fingerprint(src.fingerprint, model_fp),
        )
        manifest.write(staging)
    print(f"precompute-ref: {ds.num_samples} rows scored by {model_path} -> {final}", file=sys.stderr)
    return manifest.to_dict()


def cli_main(args) -> int:
    precompute_ref(args.model_name_or_path, args.dataset_path, args.output_dir, args.batch_size)
    return 0
