"""Optimizer factories for the `optimizer:` config group (each file in cfgs/optimizer/ points at one).

Every factory takes the param groups built by the plugins (each group carries its own `lr`) and returns a
torch optimizer. Optional packages are imported only when chosen; when one is missing or cannot run on
this machine the error says which package and what to use instead. Any torch.optim class also works
directly: `_target_: torch.optim.RAdam` with `_partial_: true`.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch


class OptimizerUnavailable(RuntimeError):
    """The chosen optimizer needs a package (or a device backend) this machine does not have."""


def _probe_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def adamw(params: Iterable, lr: float = 1e-4, fused: Optional[bool] = None, **kwargs) -> torch.optim.AdamW:
    """torch AdamW; `fused: null` uses the fused CUDA kernel when a GPU is present (one kernel per step)."""
    if fused is None:
        fused = torch.cuda.is_available()
    return torch.optim.AdamW(params, lr=lr, fused=bool(fused) or None, **kwargs)


def bitsandbytes_optimizer(params: Iterable, name: str, **kwargs) -> torch.optim.Optimizer:
    """`bitsandbytes.optim.<name>` (AdamW8bit, Lion8bit, PagedAdamW8bit, ...), checked with one tiny step on
    this machine's device first, so an unusable build fails here with a clear message, not mid-training."""
    try:
        import bitsandbytes
    except Exception as error:  # ImportError, or a broken native library raising at import
        raise OptimizerUnavailable(
            f"optimizer {name} needs the bitsandbytes package, which cannot be imported here ({error}). "
            "Install a bitsandbytes build for this machine, or use optimizer=adamw (or lion).") from error
    optimizer_class = getattr(bitsandbytes.optim, name, None)
    if optimizer_class is None:
        raise OptimizerUnavailable(f"bitsandbytes {bitsandbytes.__version__} has no optimizer named {name!r}")
    device = _probe_device()
    try:  # 4096 elements: large enough that bitsandbytes really uses its 8-bit state
        probe = torch.nn.Parameter(torch.zeros(64, 64, device=device))
        probe.grad = torch.ones_like(probe)
        optimizer_class([probe]).step()
    except Exception as error:
        raise OptimizerUnavailable(
            f"optimizer {name} (bitsandbytes {bitsandbytes.__version__}) cannot run on {device} here: "
            f"{type(error).__name__}: {error}. Use optimizer=adamw, or install a bitsandbytes build that "
            "supports this device.") from error
    return optimizer_class(params, **kwargs)


def lion(params: Iterable, lr: float = 1e-4, **kwargs) -> torch.optim.Optimizer:
    """Lion (Chen et al. 2023) from the `lion-pytorch` package; use ~3-10x smaller lr than AdamW."""
    try:
        from lion_pytorch import Lion
    except ImportError as error:
        raise OptimizerUnavailable("optimizer=lion needs the lion-pytorch package: pip install lion-pytorch") \
            from error
    return Lion(params, lr=lr, **kwargs)


def prodigy(params: Iterable, lr: float = 1.0, **kwargs) -> torch.optim.Optimizer:
    """Prodigy (Mishchenko & Defazio 2023) from the `prodigyopt` package. It estimates the step size itself and
    supports one lr for all groups, so every group's lr (train.lr, block lrs) is replaced by `lr` (~1.0);
    groups with lr 0 stay frozen."""
    try:
        from prodigyopt import Prodigy
    except ImportError as error:
        raise OptimizerUnavailable("optimizer=prodigy needs the prodigyopt package: pip install prodigyopt") \
            from error
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [dict(group, lr=0.0 if group.get("lr") == 0 else lr) for group in params]
    return Prodigy(params, lr=lr, **kwargs)


def adafactor(params: Iterable, lr: Optional[float] = None, scale_parameter: bool = False,
              relative_step: bool = False, warmup_init: bool = False, **kwargs) -> torch.optim.Optimizer:
    """transformers' Adafactor with an external lr (the groups' lr and the lr scheduler), as kohya uses it."""
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=lr, scale_parameter=scale_parameter, relative_step=relative_step,
                     warmup_init=warmup_init, **kwargs)
