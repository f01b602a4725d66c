"""What a run did, for the model card: `smedjan_run.json` beside the weights of every exported folder.

Read from the run folder's own files (run_config.json and log.jsonl), so training's end and a later
`export-hf` of any checkpoint step write the same facts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

RUN_FILE = "smedjan_run.json"


def run_record(run_dir: str | Path, step: int) -> dict:
    """Data, steps, tokens and the last train/val loss logged up to `step` (absent facts are left out)."""
    run_dir = Path(run_dir)
    record: dict = {"step": step}
    cfg_path = run_dir / "run_config.json"
    if cfg_path.is_file():
        rc = json.loads(cfg_path.read_text())
        data = rc.get("data", {})
        record["data"] = data.get("corpus") or data.get("dataset")
        record.update(
            steps=rc.get("steps"),
            batch_size=rc.get("batch_size"),
            seq_len=rc.get("seq_len"),
            tokens_seen=step * rc.get("batch_size", 0) * rc.get("seq_len", 0) or None,
            objective=rc.get("objective", {}).get("name"),
            optimizer=rc.get("optim"),
            schedule=rc.get("schedule"),
        )
    log = run_dir / "log.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if rec.get("step", 0) > step:
                continue
            if "loss" in rec:
                record["train_loss"] = round(rec["loss"], 4)
                record["wall_s"] = round(rec.get("elapsed_s", 0), 1)
            if "val_loss" in rec:
                record["val_loss"] = round(rec["val_loss"], 4)
                record["val_perplexity"] = round(math.exp(min(rec["val_loss"], 50)), 2)
    return {k: v for k, v in record.items() if v is not None}
