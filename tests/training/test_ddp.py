"""Two CPU processes (torchrun, gloo DDP): one experiment dir, only rank 0 writes, identical weights on
both ranks, the logged loss is the mean of the ranks' own losses, a training state that holds each
rank's own RNG, and a one-process run that continues that state."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from hcpdiff_like.config.launcher import compose_config
from hcpdiff_like.training.checkpoints import load_safetensors
from hcpdiff_like.training.trainer import Trainer
from hcpdiff_like.training.state_files import read_state
from subprocess_runs import child_env, only_dir

# The real entry point; after training, every rank writes a hash of its trained parameters.
HASHING_ENTRY = """
import hashlib, json, os, sys
from hcpdiff_like.training.trainer import Trainer

original_train, original_loss = Trainer.train, Trainer.diffusion_loss
local_losses = []

def loss_and_record(self, batch):  # this rank's own loss, before any averaging
    loss = original_loss(self, batch)
    local_losses.append(float(loss))
    return loss

def train_and_hash(self):
    summary = original_train(self)
    digest = hashlib.sha256()
    for param in self.trainable_parameters:
        digest.update(param.detach().cpu().numpy().tobytes())
    rank = self.accelerator.process_index
    with open(os.path.join(os.environ["HASH_DIR"], f"rank{rank}.sha256"), "w") as handle:
        handle.write(digest.hexdigest())
    with open(os.path.join(os.environ["HASH_DIR"], f"rank{rank}.json"), "w") as handle:
        json.dump({"local": local_losses, "final_loss": summary["final_loss"]}, handle)
    return summary

Trainer.train, Trainer.diffusion_loss = train_and_hash, loss_and_record
from hcpdiff_like.train import main
sys.argv = ["hcpdiff_like.train", *sys.argv[1:]]
main()
"""


def validation_overrides(images) -> list[str]:  # a held-out set of 5 one-image batches
    source = f"{{_target_:hcpdiff_like.data.sources.ImageCaptionSource,img_dir:'{images}'}}"
    return [f"+validation.sources.held_out={source}", "validation.every_n_steps=2", "validation.timesteps=[200,700]",
            "validation.batch_size=1", "validation.max_batches=5"]


def test_two_processes_share_one_dir_and_end_identical(tmp_path, tiny_sd1):
    from hcpdiff_like.data.demo import demo_data_dir

    demo = demo_data_dir()
    entry, hashes, root = tmp_path / "entry.py", tmp_path / "hashes", tmp_path / "exps"
    entry.write_text(HASHING_ENTRY)
    hashes.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(entry),
               "cfg=demo", "logger=[console]", "train.train_steps=4", "train.save_step=1000", "train.save_state=true",
               f"model.pretrained_model_name_or_path={tiny_sd1}", f"exp_root={root}", *validation_overrides(demo)]
    result = subprocess.run(command, env=child_env(HASH_DIR=str(hashes)), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    exp_dir = only_dir(root)  # one timestamp shared by both ranks
    rank0, rank1 = (hashes / "rank0.sha256").read_text(), (hashes / "rank1.sha256").read_text()
    assert rank0 == rank1, "DDP ranks ended with different weights"

    losses = [json.loads((hashes / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert losses[0]["local"][-1] != losses[1]["local"][-1], "the ranks train on different shards"
    mean_of_ranks = (losses[0]["local"][-1] + losses[1]["local"][-1]) / 2
    assert losses[0]["final_loss"] == pytest.approx(mean_of_ranks, rel=1e-6)
    assert losses[1]["final_loss"] == losses[0]["final_loss"]

    # validation is split between the ranks and summed: before training it equals one process's figure
    single = Trainer(compose_config(["cfg=demo", "logger=[console]", f"model.pretrained_model_name_or_path={tiny_sd1}",
                                     *validation_overrides(demo)]), exp_dir=str(tmp_path / "single")).setup()
    expected = single.validator.evaluate(single)["held_out"]
    single.cleanup()
    rows = list(csv.DictReader((exp_dir / "validation.csv").open()))
    assert rows[0]["step"] == "0" and float(rows[0]["val_loss"]) == pytest.approx(expected, rel=1e-6)

    log = (exp_dir / "train.log").read_text()
    assert "processes: 2, total batch per optimizer step: 4" in log
    assert log.count("experiment dir:") == 1, "only the main process logs"
    state, _ = load_safetensors(exp_dir / "ckpts" / "unet-4.safetensors")
    assert any(t.abs().sum() > 0 for k, t in state.items() if "lora_B" in k)

    saved = read_state(exp_dir / "ckpts" / "state-4")
    assert saved["num_processes"] == 2 and len(saved["processes"]) == 2
    rng0, rng1 = (p["rng"]["torch"] for p in saved["processes"])
    assert not torch.equal(rng0, rng1), "each rank's own RNG state is saved (seed + rank)"
    assert [p["data"] for p in saved["processes"]][0] == [p["data"] for p in saved["processes"]][1]

    # the same state continued by one process: weights, optimizer and step carry on (not bit-exact: new
    # shards and RNG streams), and the run says so
    resume = [sys.executable, "-m", "hcpdiff_like.train", "cfg=demo", "logger=[console]", "train.train_steps=6",
              "train.save_step=1000", f"model.pretrained_model_name_or_path={tiny_sd1}", f"exp_root={root}",
              f"train.resume={exp_dir}"]
    result = subprocess.run(resume, env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    log = (exp_dir / "train.log").read_text()
    assert "was saved by 2 processes, this run has 1" in log and "resumed from" in log
    assert "processes: 1, total batch per optimizer step: 2" in log
    before = load_safetensors(exp_dir / "ckpts" / "unet-4.safetensors")[0]
    after = load_safetensors(exp_dir / "ckpts" / "unet-6.safetensors")[0]
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    # lora_B starts at zero and Adam moves it about lr per step: 2 steps from scratch would stay below step 4's
    def norm(state):
        return sum(float(v.norm()) for k, v in state.items() if "lora_B" in k)
    assert norm(after) > norm(before)
