"""Stopping well: SIGTERM saves and exits cleanly (a real process); a NaN loss stops or skips the step."""
from __future__ import annotations

import json
import math
import signal

import pytest
import torch

from hcpdiff_like.training.checkpoints import load_safetensors
from hcpdiff_like.training.trainer import Trainer
from subprocess_runs import finish, only_dir, slow_train_command, start, wait_for


def test_sigterm_finishes_the_step_saves_and_exits(tmp_path, tiny_sd1):
    from hcpdiff_like.data.demo import demo_data_dir

    demo_data_dir()
    root, log, ready = tmp_path / "exps", tmp_path / "run.log", tmp_path / "ready"
    process = start(slow_train_command("cfg=demo", "logger=[console]", "train.train_steps=50", "train.save_step=1000",
                                       f"model.pretrained_model_name_or_path={tiny_sd1}", f"exp_root={root}"),
                    log, SLOW_AFTER_STEP="2", SLOW_SECONDS="0.5", READY_FILE=str(ready))
    wait_for(ready.exists, process, log)  # step 3 has started
    process.send_signal(signal.SIGTERM)
    output = finish(process, log)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Traceback" not in output

    exp_dir = only_dir(root)
    summary = json.loads((exp_dir / "summary.json").read_text())
    step = summary["steps"]
    assert summary["interrupted"] == "SIGTERM" and 3 <= step < 50
    assert f"stopped by SIGTERM after step {step}" in (exp_dir / "train.log").read_text()
    # the step in flight was finished, then checkpoint + state saved for exactly that step
    state, metadata = load_safetensors(exp_dir / "ckpts" / f"unet-{step}.safetensors")
    assert metadata["hcpdiff_like.step"] == str(step)
    assert (exp_dir / "ckpts" / f"state-{step}" / "state.json").is_file()
    assert not list((exp_dir / "ckpts").glob(".*")), "no temporary files left behind"


def _nan_at(step_index: int):
    """Patch for Trainer.diffusion_loss: a NaN loss while computing step `step_index` (1-based)."""
    original = Trainer.diffusion_loss

    def diffusion_loss(self, batch):
        loss = original(self, batch)
        return loss * float("nan") if self.global_step + 1 == step_index else loss

    return diffusion_loss


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(run_train, monkeypatch, tmp_path):
    monkeypatch.setattr(Trainer, "diffusion_loss", _nan_at(3))
    with pytest.raises(SystemExit, match=r"non-finite loss \(nan\) at step 3.*last good checkpoint"):
        run_train("cfg=demo", "logger=[console]", "train.train_steps=6", "train.save_step=2")
    ckpts = only_dir(tmp_path / "exps") / "ckpts"
    assert sorted(p.name for p in ckpts.glob("unet-*")) == ["unet-2.safetensors"]
    state, _ = load_safetensors(ckpts / "unet-2.safetensors")
    assert all(torch.isfinite(t).all() for t in state.values())


def test_nonfinite_loss_skip_drops_only_that_update(run_train, monkeypatch, tmp_path):
    monkeypatch.setattr(Trainer, "diffusion_loss", _nan_at(3))
    results, runs = run_train("cfg=demo", "logger=[console]", "train.train_steps=4", "train.save_step=1",
                              "train.on_nonfinite=skip")
    assert results[0]["skipped_steps"] == 1 and results[0]["steps"] == 4 and math.isfinite(results[0]["mean_loss"])
    ckpts = runs[0] / "ckpts"
    weights = {step: load_safetensors(ckpts / f"unet-{step}.safetensors")[0] for step in (2, 3, 4)}
    assert all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2]), "step 3 changed the weights"
    assert not all(torch.equal(weights[3][k], weights[4][k]) for k in weights[3]), "step 4 did not train"
    assert all(torch.isfinite(t).all() for t in weights[4].values())
    assert "step 3: non-finite loss, update skipped" in (runs[0] / "train.log").read_text()


def test_bad_on_nonfinite_value_is_a_clear_error(run_train):
    with pytest.raises(SystemExit, match="train.on_nonfinite='ignore'"):
        run_train("cfg=demo", "logger=[console]", "train.on_nonfinite=ignore")
