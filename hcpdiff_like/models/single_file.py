"""Load a single-file original-layout checkpoint (A1111 / ComfyUI style) into a `ModelBundle`, offline.

The weights come from the file; the architecture comes from a local diffusers-style folder:
`config_dir` (`model.single_file_config`) when given, component by component, else the published
configs shipped in `hcpdiff_like/models/configs/`. A single file holds no tokenizer, so `config_dir`
must provide `tokenizer/` (and `tokenizer_2/` for SDXL). The key mapping is diffusers' own
`from_single_file` machinery, pointed at the local folder so it never asks a model hub.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

import torch

from .configs import FAMILY_CONFIG, published_config_dir
from .loading import ModelBundle, ModelLoadError
from .tiny import FAMILIES

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
UNET_PREFIX = "model.diffusion_model."
TEXT_ENCODER_PREFIXES = {  # the checkpoint keys each text encoder of each family owns
    "sd1": ("cond_stage_model.transformer.",),
    "sd2": ("cond_stage_model.model.",),
    "sdxl": ("conditioner.embedders.0.", "conditioner.embedders.1."),
}


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a pickled .ckpt loaded with `torch.load(weights_only=True)`."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"single-file checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise ModelLoadError(f"{path} is not a readable .safetensors file: {error}") from error
    elif path.suffix in PICKLE_SUFFIXES:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            text = str(error)
            reason = text.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip() or text
            raise ModelLoadError(
                f"{path}: refusing to unpickle this file: torch.load(weights_only=True) rejects it, so it is not a "
                "plain-tensor checkpoint (loading it fully could run code from the file). Convert it to "
                f".safetensors in a trusted environment first. ({reason})") from error
        except (RuntimeError, EOFError, OSError) as error:
            raise ModelLoadError(f"{path} is not a readable checkpoint: {error}") from error
    else:
        raise ModelLoadError(f"{path}: not a checkpoint file (expected .safetensors, or .ckpt loadable with "
                             "weights_only=True)")
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise ModelLoadError(f"{path} does not hold a dictionary of tensors")
    return tensors


def detect_single_file_family(state: dict[str, torch.Tensor], path: str | Path = "") -> str:
    """SDXL: sgm `conditioner.embedders.1` (OpenCLIP bigG); SD2: `cond_stage_model.model` (OpenCLIP); SD1: CLIP."""
    keys = state.keys()
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    if not has_unet:
        sample = ", ".join(sorted(keys)[:3])
        hint = (" It looks like a diffusers component file; load its folder instead."
                if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys) else "")
        raise ModelLoadError(f"{path}: no '{UNET_PREFIX}*' keys, so not an SD1.x/SD2.x/SDXL single-file checkpoint "
                             f"(first keys: {sample}).{hint}")
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise ModelLoadError(f"{path}: looks like an SDXL refiner (one OpenCLIP encoder), which is not supported")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    context = [v.shape[-1] for k, v in state.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    by_width = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
    if context and context[0] in by_width:
        return by_width[context[0]]
    raise ModelLoadError(f"{path}: unknown layout; it has UNet keys but no text encoder keys this loader knows "
                         "(cond_stage_model.transformer / cond_stage_model.model / conditioner.embedders.N); "
                         "force the family with model.family=sd1|sd2|sdxl")


def _component_dir(config_dir: Optional[Path], family: str, subfolder: str) -> Path:
    """`config_dir` when it has this component's config, else the shipped published one."""
    if config_dir is not None and (config_dir / subfolder).is_dir():
        return config_dir
    return published_config_dir(FAMILY_CONFIG[family])


def _check_loaded(model, what: str, path: Path, config_root: Path) -> None:
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelLoadError(f"{path}: the checkpoint has no weights for {len(missing)} {what} parameters of the "
                             f"architecture in {config_root} (e.g. {missing[0]}); wrong family or config folder?")


def _load_component(build, what: str, path: Path, config_root: Path):
    try:
        model = build()
    except (RuntimeError, ValueError, KeyError) as error:
        raise ModelLoadError(f"{path}: the {what} weights do not fit the architecture in {config_root} "
                             f"(wrong family or config folder?): {error}") from error
    _check_loaded(model, what, path, config_root)
    return model


def _load_tokenizer(config_dir: Optional[Path], subfolder: str, family: str, path: Path):
    from transformers import CLIPTokenizer

    if config_dir is None or not (config_dir / subfolder).is_dir():
        where = f"{config_dir} has no '{subfolder}/' folder" if config_dir else "no config folder was given"
        raise ModelLoadError(
            f"{path}: a single-file checkpoint holds no tokenizer and {where}. Pass a local diffusers folder of "
            f"the same family ({family}) with '{subfolder}/' as model.single_file_config=<folder> "
            "(tools: --config_dir <folder>); its other components' configs are used too when present.")
    return CLIPTokenizer.from_pretrained(str(config_dir / subfolder), model_max_length=77, local_files_only=True)


def load_single_file_bundle(path: str | Path, family: Optional[str] = None,
                            config_dir: Optional[str | Path] = None, extract_ema: bool = False) -> ModelBundle:
    """Build a `ModelBundle` from one original-layout checkpoint; `family` forces the detected one.
    `extract_ema`: take the UNet's EMA copy (`model_ema.*`) from files that hold both (e.g. v1-5-pruned)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    config_dir = Path(config_dir).expanduser() if config_dir else None
    if config_dir is not None and not config_dir.is_dir():
        raise ModelLoadError(f"model.single_file_config: {config_dir} is not a folder")
    state = read_checkpoint(path)
    detected = detect_single_file_family(state, path)
    family = family or detected
    if family not in FAMILIES:
        raise ModelLoadError(f"model.family={family!r} is not one of {FAMILIES}")
    if family != detected:
        raise ModelLoadError(f"{path}: model.family={family} was forced but the file's keys are an {detected} "
                             "checkpoint")
    tokenizers = [_load_tokenizer(config_dir, "tokenizer", family, path)]
    if family == "sdxl":
        tokenizers.append(_load_tokenizer(config_dir, "tokenizer_2", family, path))

    def single_file(cls, subfolder, **options):
        root = _component_dir(config_dir, family, subfolder)
        return _load_component(lambda: cls.from_single_file(state, config=str(root), subfolder=subfolder,
                                                            local_files_only=True, torch_dtype=torch.float32,
                                                            **options),
                               subfolder, path, root)

    def text_encoder(cls, subfolder, prefix):
        root = _component_dir(config_dir, family, subfolder)
        own = {k: v for k, v in state.items() if k.startswith(prefix)}  # one encoder's keys: no ambiguity
        if not own:
            raise ModelLoadError(f"{path}: no '{prefix}*' keys for {subfolder} of this {family} checkpoint")
        return _load_component(lambda: create_diffusers_clip_model_from_ldm(
            cls, own, subfolder=subfolder, config=str(root), torch_dtype=torch.float32, local_files_only=True),
            subfolder, path, root)

    prefixes = TEXT_ENCODER_PREFIXES[family]
    scheduler_root = _component_dir(config_dir, family, "scheduler")
    bundle = ModelBundle(
        family=family,
        unet=single_file(UNet2DConditionModel, "unet", extract_ema=extract_ema),
        vae=single_file(AutoencoderKL, "vae"),
        noise_scheduler=DDPMScheduler.from_pretrained(str(scheduler_root), subfolder="scheduler",
                                                      local_files_only=True),
        tokenizer=tokenizers[0],
        text_encoder=text_encoder(CLIPTextModel, "text_encoder", prefixes[0]),
        source=str(path),
        extras={"single_file_config": str(config_dir) if config_dir else None},
    )
    if family == "sdxl":
        bundle.tokenizer_2 = tokenizers[1]
        bundle.text_encoder_2 = text_encoder(CLIPTextModelWithProjection, "text_encoder_2", prefixes[1])
    return bundle
