"""Smoke runs of tools/bench/gpu_sd15.py and gpu_sdxl.py on the CPU (--device cpu --tiny, 1-2 steps)."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[2] / "tools" / "bench"
SMOKE = ["--device", "cpu", "--tiny", "--batch-sizes", "1", "--warmup", "0", "--steps", "1", "--mixed-precision", "no"]
ROW = re.compile(r"^(framework|reference)\s+batch\s+(\d+):\s+([0-9.]+) it/s,\s+([0-9.]+) images/s, peak memory (\S+) "
                 r"GiB, ([0-9.]+) TFLOP/step, MFU (\S+)$", re.M)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("name", ["gpu_sd15", "gpu_sdxl"])
def test_refuses_clearly_without_cuda(name):
    with pytest.raises(SystemExit, match="--device cpu --tiny"):
        load_script(name).main(["--batch-sizes", "1"])
    with pytest.raises(SystemExit, match="add --tiny"):
        load_script(name).main(["--device", "cpu"])


def test_sd15_smoke_prints_figures_and_a_lever(tmp_path, tiny_sd1, capsys):
    out = tmp_path / "sd15.json"
    report = load_script("gpu_sd15").main(SMOKE + ["--lever-sweep", "fused_adamw", "--json", str(out)])
    printed = capsys.readouterr().out
    rows = {match.group(1): match for match in ROW.finditer(printed)}
    assert set(rows) == {"framework", "reference"}
    for match in rows.values():
        assert float(match.group(3)) > 0 and float(match.group(4)) == pytest.approx(float(match.group(3)), rel=0.01)
    # the same model doing the same work: the FLOP counts of the two loops agree
    framework, reference = (next(r for r in report["rows"] if r["impl"] == impl) for impl in ("framework", "reference"))
    assert framework["tflop_per_step"] > 0
    assert framework["tflop_per_step"] == pytest.approx(reference["tflop_per_step"], rel=0.05)
    assert framework["trainable_parameters"] == reference["trainable_parameters"]
    assert re.search(r"^lever fused_adamw\s+\+\+optimizer.fused=true\s+[0-9.]+ s/step, x[0-9.]+ vs baseline", printed,
                     re.M)
    assert json.loads(out.read_text())["levers"][0]["lever"] == "fused_adamw"


def test_sdxl_smoke_prints_figures(tiny_sdxl, capsys):
    report = load_script("gpu_sdxl").main(SMOKE)
    printed = capsys.readouterr().out
    assert {m.group(1) for m in ROW.finditer(printed)} == {"framework", "reference"}
    assert report["model"] == "tiny:sdxl" and all(row["images_per_s"] > 0 for row in report["rows"])
