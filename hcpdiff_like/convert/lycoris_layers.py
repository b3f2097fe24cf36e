"""LoHa and LoKr layers in the kohya/LyCORIS file format, which A1111 webui and ComfyUI read natively.

One layer is `<kohya name>.<tensor>` with PEFT's own tensor names and shapes (LyCORIS and PEFT agree):
LoHa `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b` (+ `hada_t1`, `hada_t2` for Tucker convs);
LoKr `lokr_w1` or `lokr_w1_a`/`lokr_w1_b`, `lokr_w2` or `lokr_w2_a`/`lokr_w2_b` (+ `lokr_t2`); and `.alpha`.
kohya_lora.py handles the whole file; this module turns one layer's tensors from our form to theirs and back.

Scale. PEFT computes alpha / rank. The consumers take the rank from the tensors (LoHa: `hada_w1_b.shape[0]`;
LoKr: the rank of a decomposed factor, and scale 1 when both factors are full matrices, whatever alpha says),
and LyCORIS 4's own loader multiplies the scale in twice. So the export folds alpha / rank into the first
factor and writes alpha = that rank: scale 1 for everyone, the same layer in every consumer.
"""
from __future__ import annotations

from typing import Optional

import torch

LOHA_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
TENSORS = {"loha": LOHA_TENSORS, "lokr": LOKR_TENSORS}


class LycorisLayerError(ValueError):
    """The tensors of one layer do not form a LoHa / LoKr layer we can convert; the message says why."""


def layer_type(suffix: str) -> Optional[str]:
    """'loha' / 'lokr' for a tensor name of that type, else None."""
    return next((kind for kind, names in TENSORS.items() if suffix in names), None)


def _check_complete(kind: str, tensors: dict, where: str) -> None:
    if kind == "loha":
        missing = [n for n in LOHA_TENSORS[:4] if n not in tensors]
        if ("hada_t1" in tensors) != ("hada_t2" in tensors):
            missing.append("hada_t2" if "hada_t1" in tensors else "hada_t1")
    else:
        missing = [n for n, parts in (("lokr_w1", ("lokr_w1_a", "lokr_w1_b")), ("lokr_w2", ("lokr_w2_a", "lokr_w2_b")))
                   if n not in tensors and not all(p in tensors for p in parts)]
        if "lokr_t2" in tensors and "lokr_w2_a" not in tensors:
            missing.append("lokr_w2_a")
    if missing:
        raise LycorisLayerError(f"{where}: {kind} layer lacks {', '.join(missing)}")


def consumer_rank(kind: str, tensors: dict) -> Optional[int]:
    """The rank webui / ComfyUI divide alpha by; None for a LoKr with two full factors (they use scale 1)."""
    if kind == "loha":
        return int(tensors["hada_w1_b"].shape[0])
    if "lokr_w2_b" in tensors:
        return int(tensors["lokr_w2_b"].shape[0])
    if "lokr_w1_b" in tensors:
        return int(tensors["lokr_w1_b"].shape[0])
    return None


def to_kohya_layer(kind: str, module: str, state: dict, rank: int, alpha: float) -> tuple[dict, float, list]:
    """Our PEFT tensors of `module` -> ({tensor name: tensor}, alpha to write, our keys used).
    The scale alpha / rank moves into the first factor (see the module docstring)."""
    tensors = {name: state[f"{module}.{name}"] for name in TENSORS[kind] if f"{module}.{name}" in state}
    _check_complete(kind, tensors, module)
    first = {"loha": "hada_w1_a"}.get(kind) or ("lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a")
    scale = alpha / rank
    if scale != 1.0:
        tensors[first] = (tensors[first].float() * scale).to(tensors[first].dtype)
    written_alpha = consumer_rank(kind, tensors)
    return tensors, float(written_alpha if written_alpha is not None else rank), [f"{module}.{n}" for n in tensors]


def _peft_factorization(dimension: int, factor: int) -> tuple[int, int]:
    from peft.tuners.lokr.layer import factorization

    return factorization(dimension, factor)


def _lokr_factor(tensors: dict, where: str) -> int:
    """PEFT's `decompose_factor` that splits the layer into these factor shapes."""
    w1_rows, w1_cols = (tuple(tensors["lokr_w1"].shape[:2]) if "lokr_w1" in tensors else
                        (tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1]))
    if "lokr_w2" in tensors:
        w2_rows, w2_cols = tensors["lokr_w2"].shape[:2]
        column_options = [int(w2_cols)]
    elif "lokr_t2" in tensors:  # Tucker: w2_a is (rank, rows), w2_b (rank, cols)
        w2_rows, w2_cols = tensors["lokr_w2_a"].shape[1], tensors["lokr_w2_b"].shape[1]
        column_options = [int(w2_cols)]
    else:  # w2_b is (rank, cols) for a Linear, (rank, cols * kh * kw) for a conv: try 1x1, then 3x3 kernels
        w2_rows, w2_cols = tensors["lokr_w2_a"].shape[0], tensors["lokr_w2_b"].shape[1]
        column_options = [int(w2_cols) // kernel for kernel in (1, 9) if w2_cols % kernel == 0]
    out_dim = int(w1_rows * w2_rows)
    for columns in column_options:
        for factor in (-1, *sorted({int(w1_rows), int(w1_cols), int(w2_rows), columns})):
            if (_peft_factorization(out_dim, factor) == (w1_rows, w2_rows)
                    and _peft_factorization(int(w1_cols * columns), factor) == (w1_cols, columns)):
                return factor
    raise LycorisLayerError(f"{where}: LoKr factor shapes w1 {w1_rows}x{w1_cols}, w2 {w2_rows}x{w2_cols} match no "
                            "PEFT decompose_factor")


def from_kohya_layer(kind: str, tensors: dict, alpha: Optional[float], where: str) -> tuple[int, float, dict]:
    """One kohya/LyCORIS layer -> (rank, alpha, PEFT options) of the block that reproduces it in PEFT;
    the tensors are used as they are. A missing or zero alpha means alpha = rank (scale 1)."""
    _check_complete(kind, tensors, where)
    rank = consumer_rank(kind, tensors)
    if kind == "loha":
        options = {"use_effective_conv2d": True} if "hada_t1" in tensors else {}
        return rank, float(alpha) if alpha else float(rank), options
    options = {}
    if "lokr_t2" in tensors:
        options["use_effective_conv2d"] = True
    if "lokr_w1_a" in tensors:
        options["decompose_both"] = True
    factor = _lokr_factor(tensors, where)
    if factor != -1:
        options["decompose_factor"] = factor
    if rank is None:  # two full factors: consumers use scale 1; a rank above half of every factor side keeps
        rank = max(max(t.shape[:2]) for t in (tensors["lokr_w1"], tensors["lokr_w2"]))  # PEFT from decomposing
        return int(rank), float(rank), options
    # PEFT decomposes a factor exactly when rank < max(its sides) / 2 (w1 only with decompose_both)
    checked = ([] if "lokr_t2" in tensors else ["lokr_w2"]) + (["lokr_w1"] if "lokr_w1_a" in tensors else [])
    for full in checked:
        sides = (tuple(tensors[full].shape[:2]) if full in tensors else
                 (int(tensors[f"{full}_a"].shape[0]), int(tensors[f"{full}_b"].shape[1])))
        if (full in tensors) != (rank >= max(sides) / 2):
            raise LycorisLayerError(f"{where}: LoKr {full} {'full' if full in tensors else 'decomposed'} at rank "
                                    f"{rank} for sides {sides}: PEFT decides that by rank < max(sides) / 2, so "
                                    "the layer cannot be rebuilt")
    return rank, float(alpha) if alpha else float(rank), options


def peft_state(module: str, tensors: dict) -> dict[str, torch.Tensor]:
    """The layer's tensors under our (PEFT) key names."""
    return {f"{module}.{name}": tensor for name, tensor in tensors.items()}
