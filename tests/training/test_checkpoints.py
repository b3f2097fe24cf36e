"""Checkpoint and state files: atomic folders, pruning, and the pickle-free state format."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from hcpdiff_like.training.checkpoints import atomic_folder, prune_checkpoints, saved_steps
from hcpdiff_like.training.resume import capture_rng, restore_rng
from hcpdiff_like.training.state_files import StateFormatError, pack, read_state, write_state


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "ckpts" / "state-5"

    def write(files):
        def _write(folder):
            for name, text in files.items():
                (folder / name).write_text(text)
        return _write

    atomic_folder(target, write({"a": "old", "b": "old"}))
    atomic_folder(target, write({"a": "new"}))
    assert sorted(p.name for p in target.iterdir()) == ["a"] and (target / "a").read_text() == "new"

    def crash(folder):
        (folder / "a").write_text("half")
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError):
        atomic_folder(target, crash)
    assert (target / "a").read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["state-5"], "no temporary folder left"


def test_prune_keeps_the_last_n_steps_of_every_kind(tmp_path):
    ckpts = tmp_path / "ckpts"
    (ckpts / "ema").mkdir(parents=True)
    for step in (100, 200, 300):
        for name in (f"unet-{step}.safetensors", f"text_encoder-{step}.safetensors", f"my-word-{step}.pt",
                     f"ema/unet-{step}.safetensors"):
            (ckpts / name).write_bytes(b"x")
        (ckpts / f"state-{step}").mkdir()
        (ckpts / f"state-{step}" / "state.json").write_text("{}")
    (ckpts / ".state-400.tmp123").mkdir()  # a save in progress is not a step
    (ckpts / "notes.txt").write_text("kept")
    assert sorted(saved_steps(ckpts)) == [100, 200, 300]

    assert prune_checkpoints(ckpts, 2) == [100]
    assert sorted(saved_steps(ckpts)) == [200, 300]
    assert len(saved_steps(ckpts)[200]) == 5  # unet, text encoder, word, ema, state
    assert (ckpts / "notes.txt").exists() and (ckpts / ".state-400.tmp123").exists()
    assert prune_checkpoints(ckpts, None) == [] and sorted(saved_steps(ckpts)) == [200, 300]


def test_state_round_trip_without_pickle(tmp_path):
    param = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([param], lr=1e-3, betas=(0.9, 0.99))
    param.grad = torch.randn(3, 2)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    scheduler.step()
    tree = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": capture_rng(),
            "int_keys": {1: "a", 2: (3, 4.5)}, "nested": [None, True, {"x": torch.arange(4, dtype=torch.uint8)}]}
    write_state(tmp_path, tree)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "tensors.safetensors"]
    json.loads((tmp_path / "state.json").read_text())  # plain JSON

    loaded = read_state(tmp_path)
    assert loaded["int_keys"] == {1: "a", 2: (3, 4.5)}
    assert torch.equal(loaded["nested"][2]["x"], torch.arange(4, dtype=torch.uint8))
    restored = torch.optim.AdamW([torch.nn.Parameter(param.detach().clone())], lr=1.0)
    restored.load_state_dict(loaded["optimizer"])
    assert restored.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    restored_moment, moment = (o.state_dict()["state"][0]["exp_avg_sq"] for o in (restored, optimizer))
    assert torch.equal(restored_moment, moment)

    expected = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(loaded["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_state_refuses_what_would_need_pickle(tmp_path):
    with pytest.raises(StateFormatError, match="at 'optimizer.fn'"):
        pack({"optimizer": {"fn": lambda: 0}}, None)
    (tmp_path / "state.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tensors.safetensors is missing"):
        read_state(tmp_path)
