"""OmegaConf resolvers used by the shipped configs.

* `${hcp.time:}`   the launch time `%Y-%m-%d-%H-%M-%S`, identical on every process of a
                   multi-process run (the main process's clock is broadcast once at start-up).
* `${hcp.eval:"512*512"}`  arithmetic on numbers only (no names, no calls).
* `${hcp.cfgs:}`   the folder of the shipped configs (for prompt templates and the like).
* `${hcp.demo_data:}` the generated demo dataset (written to the local cache on first use).
* `${hcp.resume_or:${train.resume},<new dir>}`  the experiment dir of the run being resumed, else <new dir>.
"""
from __future__ import annotations

import ast
import operator
import os
import time

from omegaconf import OmegaConf

LAUNCH_TIME_ENV = "HCPDIFF_LIKE_LAUNCH_TIME"
TIME_FORMAT = "%Y-%m-%d-%H-%M-%S"

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.USub: operator.neg,
              ast.UAdd: operator.pos, ast.Mod: operator.mod}


def safe_eval(expression: str):
    """Evaluate an arithmetic expression of numbers; anything else is refused."""

    def _eval(node):
        if isinstance(node, ast.Expression):
            return _eval(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](_eval(node.left), _eval(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](_eval(node.operand))
        raise ValueError(f"hcp.eval only takes arithmetic on numbers, got {expression!r}")

    return _eval(ast.parse(str(expression), mode="eval"))


def launch_time() -> str:
    if LAUNCH_TIME_ENV not in os.environ:
        os.environ[LAUNCH_TIME_ENV] = time.strftime(TIME_FORMAT)
    return os.environ[LAUNCH_TIME_ENV]


def cpu_processes() -> bool:
    """True for a multi-process launch without a GPU: accelerate then needs `cpu=True` to use gloo
    (MULTI_CPU); without it every process silently trains alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch

    return not torch.cuda.is_available()


def share_launch_time() -> str:
    """Agree on one launch time across processes (torchrun / accelerate launch) before Hydra runs."""
    if LAUNCH_TIME_ENV in os.environ:
        return os.environ[LAUNCH_TIME_ENV]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState
        from accelerate.utils import broadcast_object_list

        PartialState(cpu=cpu_processes())  # initialises the process group from the launcher's environment
        shared = [time.strftime(TIME_FORMAT)]
        broadcast_object_list(shared, from_process=0)
        os.environ[LAUNCH_TIME_ENV] = shared[0]
    return launch_time()


def _cfgs_dir() -> str:
    from .launcher import shipped_cfg_dir

    return str(shipped_cfg_dir())


def _demo_data(count: int = 8) -> str:
    from ..data.demo import demo_data_dir

    return str(demo_data_dir())


def _resume_or(resume, new_dir):
    """A resume path that leads nowhere falls back to `new_dir`; the trainer then names the problem."""
    if not resume:
        return new_dir
    from ..training.resume import ResumeError, experiment_dir_of

    try:
        return experiment_dir_of(resume)
    except ResumeError:
        return new_dir


def register_resolvers() -> None:
    for name, function in (("hcp.time", lambda fmt=None: launch_time() if not fmt else time.strftime(fmt)),
                           ("hcp.eval", safe_eval),
                           ("hcp.cfgs", _cfgs_dir),
                           ("hcp.demo_data", _demo_data),
                           ("hcp.resume_or", _resume_or)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function, use_cache=False)
