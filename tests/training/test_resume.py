"""Exact resume, with real processes: a run killed with SIGKILL and resumed from its last state ends with
the same weights, bit for bit, as a run that was never interrupted."""
from __future__ import annotations

import json

import pytest
import torch

from hcpdiff_like.training.checkpoints import load_safetensors
from subprocess_runs import finish, only_dir, slow_train_command, start, train_command, wait_for


@pytest.fixture()
def common(tiny_sd1):
    from hcpdiff_like.data.demo import demo_data_dir

    demo_data_dir()  # generated once here, not raced by two children
    # 4 batches per epoch; states at 3 (mid-epoch), 6 (mid-epoch, after an epoch boundary) and 8
    return ["cfg=demo", "logger=[console]", "train.train_steps=8", "train.save_step=3", "train.save_state=true",
            f"model.pretrained_model_name_or_path={tiny_sd1}"]


def test_sigkill_then_resume_is_bit_identical(tmp_path, common):
    straight_root, killed_root = tmp_path / "straight", tmp_path / "killed"
    straight = start(train_command(*common, f"exp_root={straight_root}", "train.keep_last_n=2"),
                     tmp_path / "straight.log")
    killed = start(slow_train_command(*common, f"exp_root={killed_root}"), tmp_path / "killed.log",
                   SLOW_AFTER_STEP="3", SLOW_SECONDS="2")

    state_3 = lambda: any(killed_root.glob("*/ckpts/state-3/state.json"))  # noqa: E731 (renamed = complete)
    wait_for(state_3, killed, tmp_path / "killed.log")
    killed.kill()  # SIGKILL: no handler, no cleanup
    killed.wait(timeout=60)
    assert killed.returncode == -9
    exp_dir = only_dir(killed_root)
    assert not (exp_dir / "ckpts" / "unet-8.safetensors").exists()

    resumed_log = tmp_path / "resumed.log"
    resumed = start(train_command(*common, f"exp_root={killed_root}", f"train.resume={exp_dir}"), resumed_log)
    output = finish(resumed, resumed_log)
    assert resumed.returncode == 0, output[-3000:]
    assert f"resumed from {exp_dir / 'ckpts' / 'state-3'} at step 3" in output
    assert only_dir(killed_root) == exp_dir, "a resumed run continues in the same experiment dir"
    assert (exp_dir / "cfg.yaml").is_file() and list(exp_dir.glob("cfg-resume-*.yaml"))

    straight_output = finish(straight, tmp_path / "straight.log")
    assert straight.returncode == 0, straight_output[-3000:]
    reference = only_dir(straight_root)
    assert sorted(p.name for p in (reference / "ckpts").iterdir()) == [  # train.keep_last_n=2 pruned step 3
        "state-6", "state-8", "unet-6.safetensors", "unet-8.safetensors"]
    for step in (6, 8):
        expected, _ = load_safetensors(reference / "ckpts" / f"unet-{step}.safetensors")
        got, _ = load_safetensors(exp_dir / "ckpts" / f"unet-{step}.safetensors")
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"step {step}: {key} differs after resume"
        assert any(t.abs().sum() > 0 for k, t in got.items() if "lora_B" in k), "LoRA did not train at all"
    # the whole run's loss numbers carry over through the state
    summary = json.loads((exp_dir / "summary.json").read_text())
    reference_summary = json.loads((reference / "summary.json").read_text())
    assert summary["final_loss"] == reference_summary["final_loss"]
    assert summary["mean_loss"] == reference_summary["mean_loss"]


def test_resume_errors_are_clear(tmp_path, run_train):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no saved training state"):
        run_train("cfg=demo", "logger=[console]", f"train.resume={empty}")
    with pytest.raises(SystemExit, match="no such folder"):
        run_train("cfg=demo", "logger=[console]", f"train.resume={tmp_path / 'missing'}")
    assert not list((tmp_path / "exps").iterdir()), "no empty experiment dir is left behind"


def test_every_stateful_part_is_restored(tmp_path, demo_images):
    from hcpdiff_like.config.launcher import compose_config
    from hcpdiff_like.training.resume import restore_training_state
    from hcpdiff_like.training.trainer import Trainer

    def make(*extra):
        cfg = compose_config(["cfg=demo", f"data.dataset1.sources.shapes.img_dir={demo_images}", "logger=[console]",
                              "train.train_steps=3", "train.save_step=3", "train.save_state=true",
                              "train.ema={decay: 0.9}", "scheduler=cosine", "scheduler.num_warmup_steps=1", *extra])
        cfg.exp_dir = str(tmp_path / "exp")
        return Trainer(cfg, exp_dir=cfg.exp_dir).setup()

    first = make()
    first.train()
    second = make(f"train.resume={tmp_path / 'exp'}")
    restore_training_state(second, second.cfg.train.resume)
    assert second.global_step == 3 and second.accelerator.step == first.accelerator.step
    for a, b in zip(first.trainable_parameters, second.trainable_parameters):
        assert torch.equal(a, b)
    moments = lambda t: [s["exp_avg_sq"] for s in t.optimizers[0].state_dict()["state"].values()]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(moments(first), moments(second)))
    assert second.lr_schedulers[0].get_last_lr() == first.lr_schedulers[0].get_last_lr()
    shadow = lambda t: t.ema.state_dict()["shadow_params"]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(shadow(first), shadow(second)))
    assert second.ema.state_dict()["optimization_step"] == 3
    assert second.loss_meter.state_dict() == first.loss_meter.state_dict()
    assert [d.state_dict() for d in second.datasets] == [{**d.state_dict(), "epoch": 1, "batch_in_epoch": 0}
                                                         if d.batch_in_epoch >= len(d.loader) else d.state_dict()
                                                         for d in first.datasets]
    first.cleanup()
    second.cleanup()
