"""Embedding (trigger word) files: read every format users bring, write the ones webui reads.

One word = one `EmbeddingFile`: its name and one `[n_vectors, dim]` tensor per text encoder
(SD1.x/SD2.x: one; SDXL: two, CLIP-L first then CLIP-G).

Written formats (A1111 webui, ComfyUI and diffusers' `load_textual_inversion` read them):
    <word>.pt           SD1/SD2: {'string_to_param': {'*': T}, 'string_to_token': {'*': 265}, 'name', 'step'}
                        SDXL:    {'clip_l': T, 'clip_g': T, 'name', 'step'}
    <word>.safetensors  SD1/SD2: {'emb_params': T} (kohya); SDXL: {'clip_l': T, 'clip_g': T}
Read formats: the above, HCP-Diffusion's `.pt` (an SDXL word as one [n, 768+1280] tensor is split by the
loader, which knows the encoder widths), and any single-tensor dict (diffusers concepts `{'<word>': T}`).
`.pt` files are read with `torch.load(weights_only=True)`: no code in a file ever runs.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")
SDXL_KEYS = ("clip_l", "clip_g")


class EmbeddingFormatError(ValueError):
    """An embedding file cannot be read or does not fit the model; the message names the file."""


@dataclass
class EmbeddingFile:
    name: str
    vectors: list[torch.Tensor]   # one [n_vectors, dim] per text encoder
    step: Optional[int] = None
    extras: dict = field(default_factory=dict)

    @property
    def n_vectors(self) -> int:
        return int(self.vectors[0].shape[0])


def _as_2d(tensor: torch.Tensor, path: Path) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise EmbeddingFormatError(f"{path}: embedding value is not a tensor")
    tensor = tensor.detach().float().cpu()
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2:
        raise EmbeddingFormatError(f"{path}: embedding tensor has shape {tuple(tensor.shape)}, expected [n, dim]")
    return tensor


def _load_raw(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # pickle with code, or not a torch file at all
        raise EmbeddingFormatError(f"{path}: not a readable embedding file ({error.__class__.__name__}: "
                                   f"{str(error).splitlines()[0][:200]})") from error
    if isinstance(data, torch.Tensor):
        return {"emb_params": data}
    if not isinstance(data, dict):
        raise EmbeddingFormatError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    return data


def read_embedding(path: str | os.PathLike, name: Optional[str] = None) -> EmbeddingFile:
    """Read one embedding file; the word is `name` or the file stem."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingFormatError(f"embedding file {path} does not exist")
    data = _load_raw(path)
    word = name or path.stem
    step = data.get("step") if isinstance(data.get("step"), int) else None
    if all(key in data for key in SDXL_KEYS):
        vectors = [_as_2d(data["clip_l"], path), _as_2d(data["clip_g"], path)]
    elif "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or not params:
            raise EmbeddingFormatError(f"{path}: 'string_to_param' holds no tensor")
        vectors = [_as_2d(params.get("*", next(iter(params.values()))), path)]
    elif "emb_params" in data:
        vectors = [_as_2d(data["emb_params"], path)]
    else:
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            raise EmbeddingFormatError(f"{path}: unknown embedding layout (keys {sorted(map(str, data))[:6]}); "
                                       "expected string_to_param, emb_params, clip_l+clip_g or one tensor")
        vectors = [_as_2d(next(iter(tensors.values())), path)]
    if len({v.shape[0] for v in vectors}) != 1:
        raise EmbeddingFormatError(f"{path}: clip_l and clip_g have different vector counts")
    return EmbeddingFile(word, vectors, step=step)


def split_for_encoders(emb: EmbeddingFile, widths: Sequence[int], source: str = "") -> list[torch.Tensor]:
    """Fit the file's tensors to the text encoders' widths (HCP's SDXL words are one concatenated tensor)."""
    widths = list(widths)
    vectors = emb.vectors
    if len(vectors) == 1 and len(widths) > 1 and vectors[0].shape[1] == sum(widths):
        vectors = list(torch.split(vectors[0], widths, dim=1))
    got = [int(v.shape[1]) for v in vectors]
    if got != widths:
        raise EmbeddingFormatError(f"embedding {emb.name!r}{' (' + source + ')' if source else ''} has vector "
                                   f"widths {got}, but the model's text encoder(s) need {widths}: made for "
                                   "another model family?")
    return vectors


def write_embedding(emb: EmbeddingFile, path: str | os.PathLike) -> Path:
    """Write in the webui-readable format picked by the suffix (.pt or .safetensors), atomically."""
    from ..training.checkpoints import atomic_write, save_safetensors

    path = Path(path)
    vectors = [v.detach().float().cpu().contiguous() for v in emb.vectors]
    step = int(emb.step or 0)
    if path.suffix == ".safetensors":
        state = dict(zip(SDXL_KEYS, vectors)) if len(vectors) == 2 else {"emb_params": vectors[0]}
        return save_safetensors(state, path, metadata={"name": emb.name, "step": str(step)})
    if path.suffix != ".pt":
        raise EmbeddingFormatError(f"{path}: embedding files end in .pt or .safetensors")
    if len(vectors) == 2:
        data = {"clip_l": vectors[0], "clip_g": vectors[1], "name": emb.name, "step": step}
    else:
        data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors[0]}, "name": emb.name, "step": step}
    return atomic_write(path, lambda temp: torch.save(data, temp))


# -- creating a new word (tools.create_embedding) -------------------------------------------------------
_RANDOM_PART = re.compile(r"\*\[\s*([0-9.eE+-]+)\s*(?:,\s*(\d+)\s*)?\]")


class WordExistsError(ValueError):
    pass


def check_new_word(tokenizer, name: str) -> None:
    """A trigger word must be new: a name that is already one token of the vocabulary is refused."""
    ids = tokenizer(name, add_special_tokens=False)["input_ids"]
    if len(ids) == 1 or name in tokenizer.get_vocab():
        raise WordExistsError(f"word name {name!r} is already a single token of the tokenizer "
                              f"(id {ids[0] if ids else '?'}); pick a new word, e.g. {name}_xyz")


def init_vectors(tokenizer, token_embedding: torch.nn.Embedding, n_vectors: int, init_text: Optional[str],
                 std: float, generator: torch.Generator) -> torch.Tensor:
    """HCP-Diffusion's init grammar: text -> its token embeddings; `*[std, len]` -> random N(0, std^2) rows;
    mixed (`cat, *[0.017, 2], tail`). The result is cycled/truncated to `n_vectors` rows."""
    dim = token_embedding.weight.shape[1]
    rows: list[torch.Tensor] = []
    text = init_text or ""
    position = 0
    for match in list(_RANDOM_PART.finditer(text)) + [None]:
        end = match.start() if match else len(text)
        piece = text[position:end].strip(" ,")
        if piece:
            ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            rows.append(token_embedding.weight[torch.tensor(ids)].detach().float())
        if match:
            part_std, count = float(match.group(1)), int(match.group(2) or 1)
            rows.append(torch.randn(count, dim, generator=generator) * part_std)
            position = match.end()
    if not rows:
        return torch.randn(n_vectors, dim, generator=generator) * std
    vectors = torch.cat(rows)
    if vectors.shape[0] < n_vectors:  # fewer init tokens than vectors: fill the rest randomly
        extra = torch.randn(n_vectors - vectors.shape[0], dim, generator=generator) * std
        vectors = torch.cat([vectors, extra])
    return vectors[:n_vectors].clone()


def create_embedding(model_path: str, name: str, n_vectors: int, init_text: Optional[str] = None,
                     out_dir: str | os.PathLike = "embs", std: float = 0.017, seed: Optional[int] = None,
                     replace: bool = False, out_path: str | os.PathLike | None = None,
                     single_file_config: Optional[str] = None) -> Path:
    """Write `<out_dir>/<name>.pt` for the model at `model_path` (tokenizers + text encoders only;
    a single-file checkpoint takes its tokenizer(s) from `single_file_config`)."""
    from ..models.loading import load_text_components

    if n_vectors < 1:
        raise ValueError(f"n_vectors must be >= 1, got {n_vectors}")
    path = Path(out_path) if out_path else Path(out_dir) / f"{name}.pt"
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists (pass --replace to overwrite it)")
    tokenizers, encoders = load_text_components(model_path, single_file_config=single_file_config)
    generator = torch.Generator().manual_seed(int(seed) if seed is not None else torch.seed() % (2 ** 63))
    vectors = []
    for tokenizer, encoder in zip(tokenizers, encoders):
        check_new_word(tokenizer, name)
        vectors.append(init_vectors(tokenizer, encoder.get_input_embeddings(), n_vectors, init_text, std, generator))
    return write_embedding(EmbeddingFile(name, vectors, step=0), path)
