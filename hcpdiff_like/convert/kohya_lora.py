"""Our LoRA files <-> the kohya/webui format that A1111 webui, ComfyUI and diffusers read.

Ours: one file per model (`unet-<step>.safetensors`, `text_encoder-<step>...`) with PEFT key names
`<module>.lora_A.weight` / `.lora_B.weight` and the `hcpdiff_like.lora` metadata (blocks with rank/alpha).
kohya/webui: one file, `<kohya name>.lora_down.weight` (= lora_A), `.lora_up.weight` (= lora_B) and
`.alpha` (a scalar) per module, standard `ss_*` metadata. Both use scale = alpha / rank, so the tensors
are copied unchanged and ours -> webui -> ours is bit-exact (the webui file also carries our block
metadata under `hcpdiff_like.lora_blocks`, so the blocks come back as they were).

`auto_scale_alpha` folds each module's alpha/rank into its two tensors (each times sqrt(alpha/rank)) and
writes alpha = rank: the same effect, for tools that ignore `.alpha` (HCP-Diffusion's flag of the same name
fixes HCP's own alpha convention, which our files do not have).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from ..plugins.lora import METADATA_KEY, LoraBlockSpec, lora_metadata
from ..training.checkpoints import BASE_PREFIX, load_safetensors
from .kohya_names import (KohyaNameError, UnetLayout, kohya_to_module, module_to_kohya, split_kohya_name)
from .lycoris_layers import LycorisLayerError, from_kohya_layer, layer_type, peft_state, to_kohya_layer

DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
EMBEDDED_KEY = "hcpdiff_like.lora_blocks"
# LyCORIS / kohya tensors we do not convert (yet), by key suffix
UNSUPPORTED_SUFFIXES = {"dora_scale": "DoRA", "lora_mid.weight":
                        "LoCon CP/Tucker", "diff": "full-weight diff", "diff_b": "full-weight diff",
                        "on_input": "IA3", "oft_blocks": "OFT"}
# first parts of the layer names of a diffusers UNet / transformers CLIP text encoder
KNOWN_ROOTS = (("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "conv_norm_out", "time_embedding.",
                "add_embedding.", "class_embedding.", "encoder_hid_proj"),
               ("text_model.", "encoder.", "embeddings.", "final_layer_norm", "text_projection"))
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}


class LoraFormatError(ValueError):
    """A LoRA file is not what the conversion needs; the message names the file or key."""


@dataclass
class OurLora:
    """One of our per-model LoRA files, parsed."""

    target: str
    family: str
    state: dict
    metadata: dict
    info: dict  # the parsed `hcpdiff_like.lora` JSON
    source: str = ""


def looks_like_kohya(state: Iterable[str]) -> bool:
    return any(key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for key in state)


def parse_our_lora(state: dict, metadata: dict, source: str = "") -> OurLora:
    if METADATA_KEY not in metadata:
        if looks_like_kohya(state):
            raise LoraFormatError(f"{source} is a kohya/webui LoRA file, not one of ours: convert it with "
                                  "python -m hcpdiff_like.tools.lora_convert --from_webui")
        raise LoraFormatError(f"{source} has no '{METADATA_KEY}' metadata: not a LoRA file written by hcpdiff_like")
    info = json.loads(metadata[METADATA_KEY])
    family = info.get("family") or metadata.get("hcpdiff_like.family", "")
    return OurLora(info["target"], family, state, metadata, info, source)


def read_our_lora(path: str | os.PathLike) -> OurLora:
    state, metadata = read_lora_safetensors(path)
    return parse_our_lora(state, metadata, str(path))


def read_kohya_lora(path: str | os.PathLike) -> tuple[dict, dict]:
    state, metadata = read_lora_safetensors(path)
    if not looks_like_kohya(state):
        hint = " (it is one of ours; use --to_webui)" if METADATA_KEY in metadata else ""
        raise LoraFormatError(f"{path} is not a kohya/webui LoRA file: no lora_unet_* / lora_te*_ keys{hint}")
    return state, metadata


def read_lora_safetensors(path) -> tuple[dict, dict]:
    path = str(path)
    if not path.endswith(".safetensors"):
        raise LoraFormatError(f"{path}: LoRA files must be .safetensors (pickled .pt/.ckpt files are not read)")
    try:
        return load_safetensors(path)
    except FileNotFoundError:
        raise
    except Exception as error:  # a truncated or non-safetensors file
        raise LoraFormatError(f"{path} is not a readable safetensors file: {error}") from error


# -- ours -> kohya ----------------------------------------------------------------------------------------
def _fold_scale(down: torch.Tensor, up: torch.Tensor, alpha: float, rank: int):
    scale = alpha / rank
    root = math.sqrt(abs(scale))
    return down * root, up * (root if scale >= 0 else -root), float(rank)


def ours_to_kohya(loras: Sequence[OurLora], sgm_layout: Optional[UnetLayout] = None,
                  auto_scale_alpha: bool = False) -> tuple[dict, dict]:
    """Several of our files (one per model) -> one kohya state dict + ss_* metadata."""
    families = {lora.family for lora in loras}
    if len(families) != 1:
        raise LoraFormatError(f"the files are for different model families {sorted(families)}: "
                              + ", ".join(f"{l.source} ({l.family})" for l in loras))
    family = families.pop()
    state, embedded, conv_modules = {}, {}, []
    for lora in loras:
        if lora.target in embedded:
            raise LoraFormatError(f"two files hold the {lora.target} LoRA: {lora.source}")
        extra = [k for k in lora.state if k.startswith(BASE_PREFIX)]
        if extra:
            raise LoraFormatError(f"{lora.source} also holds fully trained weights ({extra[0]}, ...): a webui LoRA "
                                  "cannot carry them; bake them with python -m hcpdiff_like.tools.merge")
        used, blocks = set(), []
        for block in lora.info["blocks"]:
            if block["type"] in ("loha", "lokr"):
                blocks.append(_lycoris_block_to_kohya(lora, block, family, sgm_layout, state, used))
                continue
            if block["type"] != "lora":
                raise LoraFormatError(f"{lora.source}: block {block['adapter']} is {block['type']}; only lora "
                                      "(incl. LoCon conv layers), loha and lokr convert to the webui format")
            rank, alpha = int(block["rank"]), float(block["alpha"])
            for module in block["modules"]:
                keys = [f"{module}.lora_A.weight", f"{module}.lora_B.weight"]
                missing = [k for k in keys if k not in lora.state]
                if missing:
                    raise LoraFormatError(f"{lora.source}: key {missing[0]} missing (block {block['adapter']})")
                down, up = lora.state[keys[0]], lora.state[keys[1]]
                if down.shape[0] != rank:
                    raise LoraFormatError(f"{lora.source}: {keys[0]} has rank {down.shape[0]}, metadata says {rank}")
                module_alpha = alpha
                if auto_scale_alpha:
                    down, up, module_alpha = _fold_scale(down, up, alpha, rank)
                name = module_to_kohya(module, lora.target, family, sgm_layout)
                state[f"{name}.{DOWN}"], state[f"{name}.{UP}"] = down, up
                state[f"{name}.{ALPHA}"] = torch.tensor(module_alpha, dtype=torch.float32)
                if down.ndim == 4 and tuple(down.shape[2:]) != (1, 1):
                    conv_modules.append((rank, module_alpha))
                used.update(keys)
            blocks.append(dict(block, alpha=float(rank) if auto_scale_alpha else alpha))
        leftover = sorted(set(lora.state) - used)
        if leftover:
            raise LoraFormatError(f"{lora.source}: tensors {leftover[:3]} belong to no block of its metadata")
        embedded[lora.target] = dict(lora.info, blocks=blocks)
    metadata = kohya_metadata(state, family, conv_modules, loras)
    metadata[EMBEDDED_KEY] = json.dumps(embedded)
    if sgm_layout is not None:
        metadata["hcpdiff_like.unet_layout"] = json.dumps([sgm_layout.layers_per_block,
                                                           list(sgm_layout.up_blocks_with_attention)])
    return state, metadata


def _lycoris_block_to_kohya(lora: OurLora, block: dict, family: str, sgm_layout, state: dict, used: set) -> dict:
    """A LoHa / LoKr block's layers into `state` (kohya names, scale folded in); the block as the file keeps it."""
    rank, alpha = int(block["rank"]), float(block["alpha"])
    for module in block["modules"]:
        try:
            tensors, written_alpha, keys = to_kohya_layer(block["type"], module, lora.state, rank, alpha)
        except LycorisLayerError as error:
            raise LoraFormatError(f"{lora.source}: block {block['adapter']}: {error}") from error
        name = module_to_kohya(module, lora.target, family, sgm_layout)
        state.update({f"{name}.{suffix}": tensor for suffix, tensor in tensors.items()})
        state[f"{name}.{ALPHA}"] = torch.tensor(written_alpha, dtype=torch.float32)
        used.update(keys)
    return dict(block, alpha=float(rank))  # the scale now lives in the tensors


def safetensors_hashes(state: dict) -> tuple[str, str]:
    """kohya's `sshs_model_hash` (sha256 of the tensor bytes of the file without metadata) and
    `sshs_legacy_hash` (first 8 hex digits of sha256 over 64 KiB at offset 1 MiB) that webui extensions show."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in state.items()})
    header = struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[8 + header:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def _most_common(values: list, default):
    return Counter(values).most_common(1)[0][0] if values else default


def kohya_metadata(state: dict, family: str, conv_modules: list, loras: Sequence[OurLora]) -> dict[str, str]:
    """ss_network_dim/alpha: the most common (rank, alpha) of the linear layers; conv_dim/alpha of 3x3 convs."""
    linear = [(int(v.shape[0]), float(state[k[:-len(DOWN)] + ALPHA])) for k, v in state.items()
              if k.endswith(DOWN) and (v.ndim == 2 or tuple(v.shape[2:]) == (1, 1))]
    lycoris = [(int(b["rank"]), float(b["rank"])) for l in loras for b in l.info["blocks"] if b["type"] != "lora"]
    rank, alpha = _most_common(linear or conv_modules or lycoris, (0, 0.0))
    algos = sorted({b["type"] for l in loras for b in l.info["blocks"]} & {"loha", "lokr"})
    args = {"algo": algos[0]} if len(algos) == 1 else {}
    if conv_modules:
        conv_rank, conv_alpha = _most_common(conv_modules, (0, 0.0))
        args = {"conv_dim": str(conv_rank), "conv_alpha": f"{conv_alpha:g}"}
    steps = {l.metadata.get("hcpdiff_like.step") for l in loras} - {None}
    model_hash, legacy_hash = safetensors_hashes(state)
    metadata = {
        "ss_network_module": "lycoris.kohya" if algos else "networks.lora", "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}", "ss_network_args": json.dumps(args),
        "ss_base_model_version": BASE_MODEL_VERSIONS[family], "ss_v2": str(family == "sd2"),
        "ss_training_comment": "converted from hcpdiff_like LoRA files: " + ", ".join(
            os.path.basename(l.source) for l in loras),
        "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash,
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{MODELSPEC_ARCH[family]}/lora",
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models" if family == "sdxl"
                                     else "diffusers"),
    }
    if len(steps) == 1:
        metadata["ss_steps"] = steps.pop()
    return metadata


# -- kohya -> ours ----------------------------------------------------------------------------------------
def kohya_family(state: dict, metadata: dict) -> str:
    """sdxl (lora_te1/te2 keys or ss_base_model_version), sd2 (ss_v2 or 1024-wide text encoder) or sd1."""
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl") or any(k.startswith(("lora_te1_", "lora_te2_")) for k in state):
        return "sdxl"
    if version.startswith("sd_v2") or metadata.get("ss_v2") == "True":
        return "sd2"
    widths = {int(v.shape[1]) for k, v in state.items() if k.startswith("lora_te_") and k.endswith(DOWN)}
    return "sd2" if widths == {1024} else "sd1"


def _group_modules(kohya: dict) -> dict[str, dict]:
    """{kohya module name: {tensor suffix: tensor}}, each module one kind: lora, loha or lokr."""
    modules: dict[str, dict] = {}
    for key, tensor in kohya.items():
        name, _, suffix = key.partition(".")
        if suffix in UNSUPPORTED_SUFFIXES:
            raise LoraFormatError(f"key {key}: {UNSUPPORTED_SUFFIXES[suffix]} layers are not supported by the "
                                  "conversion (LoRA, LoCon, LoHa and LoKr only)")
        if suffix not in (DOWN, UP, ALPHA) and layer_type(suffix) is None:
            raise LoraFormatError(f"key {key}: unknown kohya LoRA tensor {suffix!r}")
        modules.setdefault(name, {})[suffix] = tensor
    for name, parts in modules.items():
        kinds = {"lora" if suffix in (DOWN, UP) else layer_type(suffix) for suffix in parts} - {None}
        if len(kinds) > 1:
            raise LoraFormatError(f"kohya LoRA module {name} mixes {' and '.join(sorted(kinds))} tensors")
        if kinds == {"lora"}:
            for needed in (DOWN, UP):
                if needed not in parts:
                    raise LoraFormatError(f"kohya LoRA module {name} has no {needed}")
        if not kinds:
            raise LoraFormatError(f"kohya LoRA module {name} has only an alpha, no weights")
    return modules


@dataclass
class _Layer:
    """One module of a kohya file, as our block needs it."""

    kind: str
    rank: int
    alpha: float
    options: dict
    state: dict  # our (PEFT) key names -> tensors
    rank_fixed: bool = True  # False: a LoKr of two full factors, which any rank above half their sides rebuilds


def _lora_layer(module: str, parts: dict, auto_scale_alpha: bool) -> _Layer:
    down, up = parts[DOWN], parts[UP]
    rank = int(down.shape[0])
    alpha = float(parts[ALPHA]) if ALPHA in parts else 0.0
    alpha = float(f"{alpha:.7g}") if alpha else float(rank)  # kohya: no/zero alpha means alpha = rank
    if auto_scale_alpha:
        down, up, alpha = _fold_scale(down, up, alpha, rank)
    return _Layer("lora", rank, alpha, {}, {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up})


def _lycoris_layer(module: str, parts: dict, source: str, name: str) -> _Layer:
    tensors = {k: v for k, v in parts.items() if k != ALPHA}
    kind = layer_type(next(iter(tensors)))
    alpha = float(f"{float(parts[ALPHA]):.7g}") if ALPHA in parts else None
    try:
        rank, alpha, options = from_kohya_layer(kind, tensors, alpha, f"{source}: {name}")
    except LycorisLayerError as error:
        raise LoraFormatError(str(error)) from error
    fixed = not (kind == "lokr" and "lokr_w1" in tensors and "lokr_w2" in tensors)
    return _Layer(kind, rank, alpha, options, peft_state(module, tensors), fixed)


def _embedded_blocks(metadata: dict) -> dict:
    try:
        return json.loads(metadata.get(EMBEDDED_KEY, "{}"))
    except json.JSONDecodeError:
        return {}


def kohya_to_ours(kohya: dict, metadata: dict, family: Optional[str] = None,
                  sgm_layout: Optional[UnetLayout] = None, auto_scale_alpha: bool = False,
                  known_modules: Optional[dict[str, set]] = None, source: str = "") -> dict[str, OurLora]:
    """One kohya file -> our per-model LoRAs {target: OurLora}. `known_modules` ({target: names}) checks
    every module exists in the model the LoRA is meant for."""
    found = kohya_family(kohya, metadata)
    if family is not None and found == "sdxl" and family != "sdxl":
        raise LoraFormatError(f"{source} is an SDXL LoRA, not for {family}")
    if family == "sdxl" and found != "sdxl" and any(k.startswith("lora_te_") for k in kohya):
        raise LoraFormatError(f"{source} is a {found} LoRA (lora_te_ keys), not an SDXL one")
    family = family or found
    embedded = _embedded_blocks(metadata)
    if auto_scale_alpha:  # the scale moves into the tensors: every block then has alpha = rank
        embedded = {t: dict(info, blocks=[dict(b, alpha=float(b["rank"])) for b in info.get("blocks", [])])
                    for t, info in embedded.items()}
    if sgm_layout is None and "hcpdiff_like.unet_layout" in metadata:
        lpb, attn = json.loads(metadata["hcpdiff_like.unet_layout"])
        sgm_layout = UnetLayout(lpb, tuple(attn))
    per_target: dict[str, dict] = {}
    for name, parts in _group_modules(kohya).items():
        try:
            target = split_kohya_name(name)[0]
            target, module = kohya_to_module(name, sgm_layout, (known_modules or {}).get(target))
        except KohyaNameError as error:
            raise LoraFormatError(f"{source}: key {name}: {error}") from error
        if target == "text_encoder_2" and family != "sdxl":
            raise LoraFormatError(f"{source}: key {name} is for SDXL's second text encoder, but family is {family}")
        if known_modules is None and not module.startswith(KNOWN_ROOTS[target != "unet"]):
            raise LoraFormatError(f"{source}: key {name} -> {target} layer {module!r} is no SD1/SD2/SDXL layer "
                                  "(a LoRA for another architecture, e.g. SD3 or FLUX?)")
        if known_modules is not None and module not in known_modules.get(target, ()):
            raise LoraFormatError(f"{source}: key {name} -> {target} layer {module!r}, which the model does not "
                                  "have (a LoRA for another model family or architecture?)")
        layer = (_lora_layer(module, parts, auto_scale_alpha) if DOWN in parts
                 else _lycoris_layer(module, parts, source, name))
        per_target.setdefault(target, {})[module] = layer
    result = {}
    for target, modules in per_target.items():
        blocks = _restore_blocks(embedded.get(target), modules) or _blocks_by_rank(modules, target)
        state = {key: tensor for layer in modules.values() for key, tensor in layer.state.items()}
        info = {"version": 1, "target": target, "family": family, "blocks": blocks}
        our_meta = {METADATA_KEY: json.dumps(info), "hcpdiff_like.family": family}
        if "ss_steps" in metadata:
            our_meta["hcpdiff_like.step"] = metadata["ss_steps"]
        result[target] = OurLora(target, family, state, our_meta, info, source)
    return result


def _restore_blocks(embedded: Optional[dict], modules: dict[str, _Layer]) -> Optional[list]:
    """Our original blocks, when the file still matches them module for module."""
    if not embedded:
        return None
    blocks = embedded.get("blocks", [])
    listed = [m for b in blocks for m in b["modules"]]
    if sorted(listed) != sorted(modules):
        return None
    for block in blocks:
        for module in block["modules"]:
            layer = modules[module]
            if layer.kind != block["type"]:
                return None
            if layer.rank_fixed and (layer.rank != int(block["rank"]) or
                                     not math.isclose(layer.alpha, float(block["alpha"]), rel_tol=1e-6)):
                return None
    return blocks


def _blocks_by_rank(modules: dict[str, _Layer], target: str) -> list:
    groups: dict[tuple, list] = {}
    for module, layer in modules.items():
        key = (layer.kind, layer.rank, layer.alpha, json.dumps(layer.options, sort_keys=True))
        groups.setdefault(key, []).append(module)
    specs = [LoraBlockSpec(layers=names, rank=rank, alpha=alpha, modules=names, adapter=f"{target}_g{i}", type=kind,
                           options=json.loads(options))
             for i, ((kind, rank, alpha, options), names) in enumerate(groups.items())]
    return json.loads(lora_metadata(specs, target, "")[METADATA_KEY])["blocks"]


def model_module_names(models: dict[str, torch.nn.Module]) -> dict[str, set]:
    """{target: names of its Linear/Conv2d layers}, for `kohya_to_ours(known_modules=...)`."""
    return {target: {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
            for target, model in models.items()}
