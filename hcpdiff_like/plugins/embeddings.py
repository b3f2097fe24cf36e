"""Trigger-word embeddings in the text encoder(s): textual inversion and pivotal tuning.

Each word is added to the tokenizer once (one new id) and, in the text encoder, expands to its n vectors:
the conditioner rewrites the word's id into n ids past the base vocabulary, and `WordEmbedding` (which
replaces the encoder's token embedding) looks those ids up in the words' own parameters. The base
embedding matrix is never touched, so everything else in the text encoder stays bit-identical, and only
the words listed as trained get gradients (a caption without the word gives its vectors exactly zero grad).

    embeddings:
      emb_dir: embs                 # every *.pt / *.safetensors here is loaded; the file stem is the word
      train:                        # words that train (the others are frozen but usable in prompts)
        - {name: surtr_arknights, lr: 3e-3}
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence

import torch

from .embedding_files import EMBEDDING_SUFFIXES, EmbeddingFile, EmbeddingFormatError, read_embedding, \
    split_for_encoders


# Network checkpoints that share a folder with words (an experiment's ckpts/): not embeddings.
NETWORK_FILE = re.compile(r"^(unet|text_encoder(_2)?)(-.*)?$")


class WordEmbedding(torch.nn.Module):
    """The base token embedding plus the words' vectors at ids >= the base vocabulary size."""

    def __init__(self, base: torch.nn.Embedding):
        super().__init__()
        self.base = base
        self.base_vocab = int(base.num_embeddings)
        self.words = torch.nn.ParameterList()
        self.names: list[str] = []

    @property
    def weight(self) -> torch.Tensor:  # code that reads `get_input_embeddings().weight` sees the base matrix
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base_vocab

    def add_word(self, name: str, vectors: torch.Tensor, trainable: bool) -> list[int]:
        """Append a word's [n, dim] vectors; returns the n encoder-side ids they answer to."""
        if name in self.names:
            raise ValueError(f"embedding word {name!r} is loaded twice")
        first = self.base_vocab + sum(int(p.shape[0]) for p in self.words)
        parameter = torch.nn.Parameter(vectors.detach().float().clone().to(self.base.weight.device),
                                       requires_grad=trainable)
        self.words.append(parameter)
        self.names.append(name)
        return list(range(first, first + int(vectors.shape[0])))

    def vectors(self, name: str) -> torch.Tensor:
        return self.words[self.names.index(name)]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not len(self.words):
            return self.base(input_ids)
        is_word = input_ids >= self.base_vocab
        out = self.base(input_ids.clamp(max=self.base_vocab - 1))
        table = torch.cat(list(self.words)).to(out.dtype)
        word_rows = table[(input_ids - self.base_vocab).clamp(min=0, max=table.shape[0] - 1)]
        return torch.where(is_word.unsqueeze(-1), word_rows, out)


def word_embedding_of(encoder: torch.nn.Module) -> WordEmbedding:
    """The encoder's `WordEmbedding`, installed on first use in place of its token embedding."""
    current = encoder.get_input_embeddings()
    if isinstance(current, WordEmbedding):
        return current
    wrapped = WordEmbedding(current)
    encoder.set_input_embeddings(wrapped)
    return wrapped


def load_embedding_dir(folder: str | os.PathLike, steps: Optional[Sequence[int]] = None) -> list[EmbeddingFile]:
    """Every embedding file in `folder` (word = file stem; `unet-*`/`text_encoder-*` files are skipped, so an
    experiment's ckpts/ works as an emb_dir). A missing folder is an error naming it.

    `steps` keeps only files named `<word>-<step>` for those steps (the visualizer's `model_steps`)."""
    folder = Path(os.path.expanduser(str(folder)))
    if not folder.is_dir():
        raise EmbeddingFormatError(f"embeddings.emb_dir: folder {folder} does not exist "
                                   "(create a word with python -m hcpdiff_like.tools.create_embedding)")
    files = sorted(p for p in folder.iterdir() if p.suffix in EMBEDDING_SUFFIXES and p.is_file()
                   and not p.name.startswith(".") and not NETWORK_FILE.match(p.stem))
    if steps is not None:
        wanted = {str(s) for s in steps}
        files = [p for p in files if "-" in p.stem and p.stem.rsplit("-", 1)[1] in wanted]
    return [read_embedding(p) for p in files]


def attach_embeddings(bundle, conditioner, files: Sequence[EmbeddingFile], train: Optional[dict] = None,
                      default_lr: float = 3e-3) -> list[dict]:
    """Add every word to the tokenizer(s) and text encoder(s); return one param group per trained word.

    `train` maps word -> lr (None = `default_lr`). A trained word that no file provides is an error."""
    train = dict(train or {})
    names = [f.name for f in files]
    missing = sorted(set(train) - set(names))
    if missing:
        raise EmbeddingFormatError(f"embeddings.train names {missing}, but no embedding file of that name was "
                                   f"loaded (found: {names or 'none'}); create it first with "
                                   "python -m hcpdiff_like.tools.create_embedding")
    widths = [int(e.get_input_embeddings().weight.shape[1]) for e in bundle.text_encoders]
    groups = []
    for emb in files:
        vectors = split_for_encoders(emb, widths)
        trainable = emb.name in train
        params = []
        for index, (tokenizer, encoder) in enumerate(zip(bundle.tokenizers, bundle.text_encoders)):
            tokenizer.add_tokens([emb.name])
            token_id = tokenizer.convert_tokens_to_ids(emb.name)
            table = word_embedding_of(encoder)
            conditioner.register_words(index, {token_id: table.add_word(emb.name, vectors[index], trainable)})
            params.append(table.vectors(emb.name))
        if trainable:
            lr = train[emb.name] if train[emb.name] is not None else default_lr
            groups.append({"params": params, "lr": float(lr), "name": f"embedding:{emb.name}", "word": emb.name})
    return groups


def trained_word_files(bundle, words: Sequence[str], step: int) -> list[EmbeddingFile]:
    """Snapshot of trained words (one tensor per text encoder) for saving as `<word>-<step>.pt`."""
    files = []
    for word in words:
        vectors = [word_embedding_of(e).vectors(word).detach().float().cpu().clone() for e in bundle.text_encoders]
        files.append(EmbeddingFile(word, vectors, step=step))
    return files
