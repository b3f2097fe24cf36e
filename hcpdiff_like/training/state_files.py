"""Nested state (optimizer/scheduler/RNG state dicts) <-> one JSON tree + one safetensors file.

Tensors go to safetensors under the path where they sat in the tree; everything else (numbers,
strings, lists, tuples, dicts with any keys, numpy arrays) goes to JSON with small type tags.
Nothing is ever unpickled on load.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

TREE_FILE = "state.json"
TENSOR_FILE = "tensors.safetensors"


class StateFormatError(TypeError):
    """A value that cannot be stored without pickling; the message names where it sits."""


def pack(value: Any, tensors: Optional[dict[str, torch.Tensor]], path: str = "") -> Any:
    """Replace tensors by `{"__tensor__": key}` (collected in `tensors`) and tag non-JSON types.

    `tensors=None` only checks that `value` can be stored (nothing is copied)."""
    if isinstance(value, torch.Tensor):
        if tensors is None:
            return None
        tensor = value.detach()
        tensor = tensor.cpu() if tensor.device.type != "cpu" else tensor.clone()
        tensors[path] = tensor.contiguous()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [pack(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [pack(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: pack(v, tensors, f"{path}.{k}") for k, v in value.items()}
        return {"__pairs__": [[pack(k, tensors, f"{path}.key{i}"), pack(v, tensors, f"{path}.{k}")]
                              for i, (k, v) in enumerate(value.items())]}
    raise StateFormatError(f"cannot store a {type(value).__name__} at '{path.lstrip('.')}' without pickling")


def unpack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [unpack(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__ndarray__" in value:
            return np.asarray(value["__ndarray__"], dtype=value["dtype"])
        if "__tuple__" in value:
            return tuple(unpack(v, tensors) for v in value["__tuple__"])
        if "__pairs__" in value:
            return {_hashable(unpack(k, tensors)): unpack(v, tensors) for k, v in value["__pairs__"]}
        return {k: unpack(v, tensors) for k, v in value.items()}
    return value


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def write_state(folder: str | Path, tree: dict) -> None:
    """Write `tree` into `folder` as state.json + tensors.safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    packed = pack(tree, tensors)
    folder = Path(folder)
    save_file(tensors, str(folder / TENSOR_FILE), metadata={"format": "hcpdiff_like.state"})
    (folder / TREE_FILE).write_text(json.dumps(packed, indent=1), encoding="utf-8")


def read_state(folder: str | Path) -> dict:
    folder = Path(folder)
    for name in (TREE_FILE, TENSOR_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"training state {folder} is incomplete: {name} is missing")
    packed = json.loads((folder / TREE_FILE).read_text(encoding="utf-8"))
    with safe_open(str(folder / TENSOR_FILE), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return unpack(packed, tensors)
