"""Smoke run of tools/bench/data_throughput.py: 6 tiny images, 2 batches, 0 and 1 workers, tiny VAE cache."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench" / "data_throughput.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("data_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_reports_every_figure(tmp_path, tiny_sd1, capsys):
    out = tmp_path / "figures.json"
    results = load_bench().main(["--images", "6", "--batches", "2", "--batch-size", "2", "--resolution", "64",
                                 "--workers", "0", "1", "--model", str(tiny_sd1), "--cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["images"] == 6 and set(saved["loader_images_per_s"]) == {"0", "1"}
    assert all(rate > 0 for rate in saved["loader_images_per_s"].values())
    assert saved["cache_disk_reused"] == 6 and saved["cached_loader_images_per_s"] > 0
    assert saved["cache_memory_build_seconds"] > 0 and saved["peak_memory"]["process_mb"] > 0
    assert "images/s" in capsys.readouterr().out
