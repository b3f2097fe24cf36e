"""Sweep summaries: every job writes `<exp_dir>/summary.json`; at the end of a multirun the Hydra callback
`SweepSummary` (registered in cfgs/base.yaml, `hydra.callbacks`) tabulates them at the sweep root as
`sweep_summary.csv` and `sweep_summary.md` (one row per job: its overrides, final and mean loss).

Reading the jobs' files instead of in-memory results keeps it working with launchers that run jobs
elsewhere (hydra-submitit-launcher on Slurm): the callback runs where the sweep was launched.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Optional

SUMMARY_FILE = "summary.json"
LOSS_COLUMNS = ("final_loss", "mean_loss", "steps", "skipped_steps", "interrupted")


def job_record(summary: dict) -> dict:
    """The run's summary plus what identifies the job (overrides, job number) when Hydra runs it."""
    record = dict(summary)
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            hydra_cfg = HydraConfig.get()
            record["overrides"] = [str(o) for o in hydra_cfg.overrides.task if not o.startswith("hydra")]
            record["job"] = hydra_cfg.job.get("num")
    except ValueError:  # HydraConfig not set in this process
        pass
    return record


def _override_pairs(overrides: list[str]) -> dict[str, str]:
    pairs = {}
    for item in overrides:
        key, _, value = item.partition("=")
        pairs[key.lstrip("+~")] = value
    return pairs


def collect(sweep_dir: str | Path) -> list[dict]:
    """The summary of every job under `sweep_dir`, ordered by job number."""
    rows = []
    for path in Path(sweep_dir).glob(f"*/{SUMMARY_FILE}"):
        record = json.loads(path.read_text(encoding="utf-8"))
        record["exp_dir"] = str(path.parent)
        rows.append(record)

    def order(record):
        job = record.get("job")
        return (0, int(job)) if isinstance(job, int) or str(job).isdigit() else (1, record["exp_dir"])

    return sorted(rows, key=order)


def table(rows: list[dict]) -> tuple[list[str], list[list[Any]]]:
    """Columns: job, one per swept key (values that differ between jobs), the loss numbers, all overrides."""
    pairs = [_override_pairs(row.get("overrides") or []) for row in rows]
    keys = sorted({k for p in pairs for k in p})
    swept = [k for k in keys if len({p.get(k) for p in pairs}) > 1] or keys
    header = ["job", *swept, *LOSS_COLUMNS, "overrides", "exp_dir"]
    body = [[row.get("job", ""), *[p.get(k, "") for k in swept], *[row.get(c, "") for c in LOSS_COLUMNS],
             " ".join(row.get("overrides") or []), os.path.basename(row["exp_dir"])]
            for row, p in zip(rows, pairs)]
    return header, body


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def write_sweep_summary(sweep_dir: str | Path) -> Optional[Path]:
    """Write `sweep_summary.csv` and `sweep_summary.md` at `sweep_dir`; returns the CSV path (None: no jobs)."""
    from .checkpoints import atomic_write

    rows = collect(sweep_dir)
    if not rows:
        return None
    header, body = table(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows([[_cell(v) for v in line] for line in body])
    markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(_cell(v).replace("|", "\\|") for v in line) + " |" for line in body]
    sweep_dir = Path(sweep_dir)
    csv_path = atomic_write(sweep_dir / "sweep_summary.csv",
                            lambda temp: Path(temp).write_text(buffer.getvalue(), encoding="utf-8"))
    atomic_write(sweep_dir / "sweep_summary.md",
                 lambda temp: Path(temp).write_text("\n".join(markdown) + "\n", encoding="utf-8"))
    return csv_path


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    Callback = object


class SweepSummary(Callback):
    """Hydra callback: after a multirun, tabulate the jobs' summary.json files at the sweep root."""

    def on_multirun_end(self, config, **kwargs) -> None:
        if os.environ.get("RANK", "0") != "0":  # multi-process sweeps: one writer
            return
        path = write_sweep_summary(config.hydra.sweep.dir)
        if path is not None:
            print(f"sweep summary: {path} and {path.with_suffix('.md')}")
