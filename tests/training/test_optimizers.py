"""Every cfgs/optimizer/*.yaml instantiates on per-group param groups and steps; missing packages and
unusable bitsandbytes builds fail with a message that names the fix."""
from __future__ import annotations

import sys

import pytest
import torch
from hydra.utils import instantiate

from hcpdiff_like.config.launcher import compose_config, shipped_cfg_dir
from hcpdiff_like.training import optimizers
from hcpdiff_like.training.optimizers import OptimizerUnavailable

OPTIMIZER_FILES = sorted(p.stem for p in (shipped_cfg_dir() / "optimizer").glob("*.yaml"))
NEEDS = {"lion": "lion_pytorch", "prodigy": "prodigyopt", "adamw8bit": "bitsandbytes", "lion8bit": "bitsandbytes"}


def param_groups():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Linear(80, 8))  # 5120 weights: 8-bit state
    return model, [{"params": list(model[0].parameters()), "lr": 1e-2, "name": "a"},
                   {"params": list(model[1].parameters()), "lr": 1e-3, "name": "b"}]


def test_the_issue_optimizers_are_shipped():
    assert {"adamw", "adamw8bit", "lion8bit", "lion", "prodigy", "adafactor", "sgd"} <= set(OPTIMIZER_FILES)


@pytest.mark.parametrize("name", OPTIMIZER_FILES)
def test_optimizer_config_instantiates_and_steps(name):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name], reason=f"optimizer={name} needs the {NEEDS[name]} package")
    cfg = compose_config(["cfg=demo", f"optimizer={name}"])
    assert cfg.optimizer._partial_ and cfg.optimizer._target_
    model, groups = param_groups()
    optimizer = instantiate(cfg.optimizer)(groups)
    expected_lrs = [1.0, 1.0] if name == "prodigy" else [1e-2, 1e-3]  # Prodigy: one lr, it finds the step
    assert [g["lr"] for g in optimizer.param_groups] == expected_lrs  # the others keep each group's lr
    before = [p.detach().clone() for p in model.parameters()]
    inputs = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        optimizer.zero_grad()
        model(inputs).pow(2).mean().backward()
        optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters())), f"{name} did not update"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if name in ("adamw8bit", "lion8bit"):  # bitsandbytes really keeps 8-bit state for the big weight
        state = optimizer.state[model[0].weight]
        assert state["state1"].dtype == torch.uint8


def test_adamw_fuses_only_when_a_gpu_is_there(monkeypatch):
    _, groups = param_groups()
    assert not optimizers.adamw(groups).defaults["fused"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = {}
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: seen.update(kw) or kw)
    optimizers.adamw(groups)
    assert seen["fused"] is True


def test_any_torch_optim_class_by_target():
    cfg = compose_config(["cfg=demo", "optimizer=sgd", "optimizer._target_=torch.optim.RMSprop",
                          "~optimizer.nesterov"])
    _, groups = param_groups()
    assert isinstance(instantiate(cfg.optimizer)(groups), torch.optim.RMSprop)


def test_bitsandbytes_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    _, groups = param_groups()
    with pytest.raises(OptimizerUnavailable, match="AdamW8bit needs the bitsandbytes package.*optimizer=adamw"):
        optimizers.bitsandbytes_optimizer(groups, name="AdamW8bit")


def test_bitsandbytes_that_cannot_run_here_is_a_clear_error(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")

    class Broken(torch.optim.Optimizer):
        def __init__(self, params, **kwargs):
            super().__init__(params, {})

        def step(self, closure=None):
            raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bnb.optim, "Lion8bit", Broken)
    _, groups = param_groups()
    with pytest.raises(OptimizerUnavailable, match=r"Lion8bit .*cannot run on cpu.*no kernel.*optimizer=adamw"):
        optimizers.bitsandbytes_optimizer(groups, name="Lion8bit")
    with pytest.raises(OptimizerUnavailable, match="no optimizer named 'Adam9bit'"):
        optimizers.bitsandbytes_optimizer(groups, name="Adam9bit")


@pytest.mark.parametrize("factory, module, package", [(optimizers.lion, "lion_pytorch", "lion-pytorch"),
                                                      (optimizers.prodigy, "prodigyopt", "prodigyopt")])
def test_missing_optimizer_package_names_the_install(monkeypatch, factory, module, package):
    monkeypatch.setitem(sys.modules, module, None)
    _, groups = param_groups()
    with pytest.raises(OptimizerUnavailable, match=f"pip install {package}"):
        factory(groups)


def test_trainer_accumulates_clips_scales_lr_and_schedules_by_train_steps(tmp_path, demo_images, tiny_sd1):
    """One optimizer step of 2 micro-batches: lr scaled by the total batch (2 x 1 process x 2), the update
    clipped to max_grad_norm (plain SGD: |update| = lr * max_grad_norm), the linear schedule over train_steps."""
    from hcpdiff_like.training.trainer import Trainer

    cfg = compose_config(["cfg=demo", f"data.dataset1.sources.shapes.img_dir={demo_images}", "logger=[console]",
                          "optimizer=sgd", "optimizer.momentum=0", "scheduler=linear",
                          "scheduler.num_warmup_steps=0", "train.train_steps=4", "train.lr=1.0",
                          "train.scale_lr=true", "train.gradient_accumulation_steps=2", "train.max_grad_norm=1e-4"])
    trainer = Trainer(cfg, exp_dir=str(tmp_path / "exp")).setup()
    base_lr = 1.0 * 2 * 1 * 2
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(base_lr)
    calls = {"loss": 0, "step": 0}
    loss_fn, step_fn = trainer.diffusion_loss, trainer.optimizer_step
    trainer.diffusion_loss = lambda batch: calls.__setitem__("loss", calls["loss"] + 1) or loss_fn(batch)
    trainer.optimizer_step = lambda: calls.__setitem__("step", calls["step"] + 1) or step_fn()
    params = trainer.trainable_parameters
    before = [p.detach().clone() for p in params]
    stream = iter(trainer.datasets[0].forever())
    trainer.train_step([[next(stream)], [next(stream)]])
    assert calls == {"loss": 2, "step": 1}
    update = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(params, before)))
    assert update.item() == pytest.approx(base_lr * 1e-4, rel=1e-3)
    assert trainer.lr_schedulers[0].get_last_lr()[0] == pytest.approx(base_lr * 3 / 4)  # 1 of 4 steps done
    assert all(p.grad is None for p in params)
    trainer.cleanup()
