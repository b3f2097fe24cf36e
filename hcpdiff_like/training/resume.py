"""Exact resume: save and restore everything a training run's future depends on.

`<exp_dir>/ckpts/state-<step>/` (written to a temporary folder, then renamed) holds
    state.json             step counters, optimizer/scheduler/scaler hyper-parameters, RNG states of
                           every process (python, numpy, torch, cuda), each dataset's position
    tensors.safetensors    trainable weights (by optimizer position), their pending gradients,
                           optimizer moments, torch RNG states, and the tensors of any other stateful part
Other stateful parts are found on the trainer: any attribute with `state_dict()`/`load_state_dict()` that
is not a torch module (EMA, loss meter, samplers, ...). A run resumed from state N with the same config
produces the same weights, bit for bit on CPU, as one that never stopped.
"""
from __future__ import annotations

import itertools
import random
import time
from pathlib import Path
from typing import Any, Iterator, Optional

STATE_FORMAT = "hcpdiff_like.state/1"
# attributes handled explicitly (or never state): not picked up by the generic scan
_NOT_EXTRA = {"optimizer", "optimizers", "lr_scheduler", "lr_schedulers", "accelerator", "model", "bundle",
              "datasets", "cfg", "exp", "loggers", "targets", "objective"}


class ResumeError(ValueError):
    """`train.resume` points at nothing resumable, or at a state that does not fit this config."""


# ---------------------------------------------------------------------------------------------- finding
def find_state(resume: str | Path) -> Path:
    """The state folder for `train.resume`: a state folder itself, or the newest one of an experiment dir."""
    from .checkpoints import saved_steps
    from .state_files import TREE_FILE

    path = Path(str(resume)).expanduser()
    if not path.exists():
        raise ResumeError(f"train.resume={resume}: no such folder")
    if (path / TREE_FILE).is_file():
        return path
    ckpts = path / "ckpts" if (path / "ckpts").is_dir() else path
    states = [entry for step, entries in sorted(saved_steps(ckpts).items()) for entry in entries
              if entry.is_dir() and (entry / TREE_FILE).is_file()]
    if not states:
        raise ResumeError(f"train.resume={resume}: no saved training state in {ckpts} "
                          "(the run needs train.save_state=true, or a SIGINT/SIGTERM stop)")
    return states[-1]


def experiment_dir_of(resume: str | Path) -> str:
    """The experiment dir a resumed run continues in (`<exp_dir>/ckpts/state-N` -> `<exp_dir>`)."""
    state = find_state(resume)
    return str(state.parent.parent if state.parent.name == "ckpts" else state.parent)


# ---------------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- parts
def _optimizers(trainer) -> list:
    return list(getattr(trainer, "optimizers", None) or [trainer.optimizer])


def _schedulers(trainer) -> list:
    return list(getattr(trainer, "lr_schedulers", None) or [trainer.lr_scheduler])


def _trainable(trainer) -> dict[str, Any]:
    """Trained parameters keyed by their position: optimizer o, param group g, index i."""
    return {f"{o}.{g}.{i}": param for o, optimizer in enumerate(_optimizers(trainer))
            for g, group in enumerate(optimizer.param_groups) for i, param in enumerate(group["params"])}


def _extra_parts(trainer) -> dict[str, Any]:
    """Every other attribute with state_dict/load_state_dict (EMA, loss meter, ...), torch modules excluded."""
    import torch

    parts = {}
    for name, value in vars(trainer).items():
        if name in _NOT_EXTRA or name.startswith("_") or isinstance(value, torch.nn.Module):
            continue
        if callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None)):
            parts[name] = value
    return parts


# ---------------------------------------------------------------------------------------------- save
def save_training_state(trainer, step: int) -> Optional[Path]:
    """Collective: every process contributes its RNG and data position; the main process writes."""
    from accelerate.utils import gather_object

    from .checkpoints import atomic_folder
    from .state_files import StateFormatError, pack, write_state

    accelerator = trainer.accelerator
    local = {"rng": capture_rng(), "data": [handle.state_dict() for handle in trainer.datasets]}
    processes = gather_object([local]) if accelerator.num_processes > 1 else [local]
    folder = None
    if accelerator.is_main_process:
        params = _trainable(trainer)
        extras = {}
        for name, part in _extra_parts(trainer).items():
            try:
                extras[name] = part.state_dict()
                pack(extras[name], None)
            except StateFormatError as error:
                extras.pop(name, None)
                trainer.loggers.info(f"warning: state of '{name}' is not saved, resume will not restore it: {error}")
        scaler = getattr(accelerator, "scaler", None)
        tree = {"format": STATE_FORMAT, "step": int(step), "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                "accelerator_step": int(getattr(accelerator, "step", 0)),
                "num_processes": accelerator.num_processes,
                "trainable": {key: p for key, p in params.items()},
                "grads": {key: p.grad for key, p in params.items() if p.grad is not None},
                "optimizers": [optimizer.state_dict() for optimizer in _optimizers(trainer)],
                "lr_schedulers": [scheduler.state_dict() for scheduler in _schedulers(trainer)],
                "grad_scaler": scaler.state_dict() if scaler is not None else None,
                "extras": extras, "processes": processes}
        folder = atomic_folder(trainer.exp.ckpt_dir / f"state-{step}", lambda temp: write_state(temp, tree))
    accelerator.wait_for_everyone()
    return folder


# ---------------------------------------------------------------------------------------------- restore
def restore_training_state(trainer, resume: str | Path) -> Optional[dict]:
    """Load the state into a set-up trainer; returns this process's RNG state for `open_streams` (None when
    the state came from another number of processes, see `_continue_elsewhere`)."""
    from .state_files import read_state

    folder = find_state(resume)
    state = read_state(folder)
    if state.get("format") != STATE_FORMAT:
        raise ResumeError(f"{folder}: not a training state of this version ({state.get('format')!r})")
    accelerator = trainer.accelerator
    same_processes = state["num_processes"] == accelerator.num_processes
    params = _trainable(trainer)
    if set(params) != set(state["trainable"]):
        raise ResumeError(f"{folder}: the saved trainable parameters ({len(state['trainable'])}) do not match "
                          f"this config's ({len(params)}); resume with the config of the saved run")
    for key, param in params.items():
        saved = state["trainable"][key]
        if saved.shape != param.shape:
            raise ResumeError(f"{folder}: trainable parameter {key} has shape {tuple(saved.shape)}, "
                              f"this config's has {tuple(param.shape)}")
        param.data.copy_(saved.to(param.device, param.dtype))
        grad = state["grads"].get(key)
        param.grad = None if grad is None else grad.to(param.device, param.dtype)
    for optimizer, saved in _zip_checked(_optimizers(trainer), state["optimizers"], "optimizers", folder):
        optimizer.load_state_dict(saved)
    for scheduler, saved in _zip_checked(_schedulers(trainer), state["lr_schedulers"], "lr schedulers", folder):
        scheduler.load_state_dict(saved)
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and state["grad_scaler"] is not None:
        scaler.load_state_dict(state["grad_scaler"])
    extras = _extra_parts(trainer)
    for name, saved in state["extras"].items():
        if name in extras:  # their tensors (EMA shadow weights) live on the training device
            extras[name].load_state_dict(_to_device(saved, accelerator.device))
        else:
            trainer.loggers.info(f"warning: the saved state has '{name}', this run has no such part")
    trainer.global_step = int(state["step"])
    if same_processes:
        mine = state["processes"][accelerator.process_index]
        for handle, position in zip(trainer.datasets, mine["data"]):
            handle.load_state_dict(position)
            if handle.batch_in_epoch >= len(handle.loader):  # the epoch was complete: start the next one
                handle.load_state_dict({**position, "epoch": handle.epoch + 1, "batch_in_epoch": 0})
        rng = mine["rng"]
    else:  # no per-process RNG state to hand back: _continue_elsewhere seeds each process anew
        _continue_elsewhere(trainer, state, folder)
        rng = None
    if hasattr(accelerator, "step"):
        accelerator.step = int(state["accelerator_step"])
    if hasattr(trainer, "loggers"):
        trainer.loggers.resumed(trainer.global_step)
        trainer.loggers.info(f"resumed from {folder} at step {trainer.global_step} (saved {state['saved_at']})")
    return rng


def _continue_elsewhere(trainer, state: dict, folder: Path) -> None:
    """A state saved by another number of processes: the data shards and per-process RNG streams do not map
    onto this run's, so each dataset starts its next epoch (the plan of every epoch is fixed by seed + epoch)
    and every process is seeded anew from seed + step + rank. Weights, optimizers, lr schedules and the step
    continue exactly; the run is no longer bit-identical to an uninterrupted one."""
    from accelerate.utils import set_seed

    accelerator = trainer.accelerator
    for index, handle in enumerate(trainer.datasets):
        positions = [process["data"][index] for process in state["processes"]]
        epoch = max(int(p["epoch"]) + (1 if int(p["batch_in_epoch"]) > 0 else 0) for p in positions)
        handle.load_state_dict({"epoch": epoch, "batch_in_epoch": 0})
    set_seed(int(trainer.cfg.seed) + int(state["step"]) + accelerator.process_index)
    if hasattr(trainer, "loggers"):
        trainer.loggers.info(f"warning: {folder} was saved by {state['num_processes']} processes, this run has "
                             f"{accelerator.num_processes}: weights, optimizer and lr schedule continue exactly, the "
                             "data restarts at the next epoch and the RNG is seeded anew (not bit-identical)")


def _to_device(value: Any, device) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _zip_checked(live: list, saved: list, what: str, folder: Path):
    if len(live) != len(saved):
        raise ResumeError(f"{folder}: {len(saved)} {what} saved, this config has {len(live)}")
    return zip(live, saved)


def open_streams(handles: list, rng_state: Optional[dict] = None) -> list[Iterator[dict]]:
    """One endless batch stream per dataset; after a resume, RNG and data order continue exactly.

    A DataLoader draws from the global RNG whenever an iterator is created. An uninterrupted run does that
    only at epoch starts, so a stream resumed mid-epoch fetches its first batch with the RNG set aside.
    """
    streams = [iter(handle.forever()) for handle in handles]
    if rng_state is None:
        return streams
    restore_rng(rng_state)
    primed = []
    for handle, stream in zip(handles, streams):
        if handle.batch_in_epoch > 0:
            outside = capture_rng()
            first = next(stream)
            restore_rng(outside)
            stream = itertools.chain([first], stream)
        primed.append(stream)
    return primed
