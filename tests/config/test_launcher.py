"""`cfg=` by name and by path, overrides, multirun, and start-up errors that name the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from hcpdiff_like.config.launcher import compose_config, translate_argv
from hcpdiff_like.config.validation import ConfigError, validate_config


def test_cfg_name_selects_shipped_experiment():
    cfg = compose_config(["cfg=demo"])
    assert cfg.train.train_steps == 200  # from cfgs/train/demo.yaml, over base.yaml's 1000
    assert cfg.model.pretrained_model_name_or_path == "tiny:sd1"


def test_base_defaults_match_hcp_diffusion():
    cfg = compose_config([])
    assert cfg.train.train_steps == 1000 and cfg.train.save_step == 100


def test_overrides_apply_on_top_of_experiment():
    cfg = compose_config(["cfg=demo", "train.train_steps=7", "plugin.rank=16", "optimizer.weight_decay=0.5"])
    assert (cfg.train.train_steps, cfg.plugin.rank, cfg.optimizer.weight_decay) == (7, 16, 0.5)


def test_cfg_path_to_user_file_anywhere(tmp_path):
    user_dir = tmp_path / "my configs"
    user_dir.mkdir()
    # Same name as a shipped experiment: the user's file must win.
    (user_dir / "demo.yaml").write_text("# @package _global_\ndefaults:\n  - override /plugin: lora_unet_te\n"
                                        "train:\n  train_steps: 3\n  lr: 0.005\nmy_variable: hello\n")
    cfg = compose_config([f"cfg={user_dir / 'demo.yaml'}"])
    assert cfg.train.train_steps == 3 and cfg.train.lr == 0.005
    assert cfg.my_variable == "hello"
    assert cfg.plugin.lora_text_encoder is not None  # composed a shipped group through the defaults list


def test_unknown_cfg_name_lists_shipped_ones():
    with pytest.raises(SystemExit, match="no shipped experiment config.*demo"):
        translate_argv(["cfg=does_not_exist"])


def test_missing_cfg_file_is_named(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        translate_argv([f"cfg={tmp_path / 'nope.yaml'}"])


def test_yaml_typo_is_reported_with_the_key(tmp_path):
    user = tmp_path / "typo.yaml"
    user.write_text("# @package _global_\ntrain:\n  trian_steps: 5\n")
    cfg = compose_config([f"cfg={user}"])
    with pytest.raises(ConfigError, match=r"train\.trian_steps.*train_steps"):
        validate_config(cfg)


def test_command_line_typo_fails_at_compose():
    from hydra.errors import ConfigCompositionException as HydraCompositionError

    with pytest.raises(HydraCompositionError, match="trian"):
        compose_config(["cfg=demo", "trian.train_steps=5"])


def test_missing_required_value_named_before_model_loads():
    cfg = compose_config(["cfg=demo", "model=sd15"])
    with pytest.raises(ConfigError, match="model.pretrained_model_name_or_path"):
        validate_config(cfg)


def test_entry_point_single_run_and_multirun(run_train, tmp_path):
    summaries, dirs = run_train("cfg=demo", "train.train_steps=2", exp_root=tmp_path / "single")
    assert len(dirs) == 1 and len(summaries) == 1
    saved = yaml.safe_load((dirs[0] / "cfg.yaml").read_text())
    assert saved["train"]["train_steps"] == 2
    assert "${" not in (dirs[0] / "cfg.yaml").read_text()  # fully resolved
    assert (dirs[0] / "ckpts" / "unet-2.safetensors").is_file()
    assert (dirs[0] / "train.log").is_file() and any((dirs[0] / "tblog").iterdir())

    summaries, dirs = run_train("-m", "cfg=demo", "train.train_steps=2", "train.lr=1e-4,2e-4",
                                exp_root=tmp_path / "sweep")
    assert len(summaries) == 2 and len(dirs) == 2
    lrs = sorted(yaml.safe_load((d / "cfg.yaml").read_text())["train"]["lr"] for d in dirs)
    assert lrs == [1e-4, 2e-4]
    assert dirs[0].parent == dirs[1].parent  # one sweep root, one dir per job


def test_bad_key_in_entry_point_stops_before_training(run_train, tmp_path):
    user = tmp_path / "bad.yaml"
    user.write_text("# @package _global_\ndefaults:\n  - /train/demo\ntrain:\n  save_stpe: 3\n")
    with pytest.raises(SystemExit, match=r"unknown config key 'train.save_stpe' \(did you mean 'save_step'"):
        run_train(f"cfg={user}", exp_root=tmp_path / "exps")
    assert not list((tmp_path / "exps").rglob("*.safetensors"))
