"""Read and write kohya's fine-tune metadata JSON (used by tools.merge_captions and tools.clean_captions).

    {"<image key>": {"caption": "a frog\\nalt caption", "tags": "open mouth, frog", ...}, ...}

The key is the image's stem (kohya's default), its path relative to the image folder, or its full path;
`hcpdiff_like.data.kohya_sources.KohyaMetadataSource` reads all three. Other fields of an entry (for example
`train_resolution`) are kept as they are.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


class MetadataError(ValueError):
    """A metadata file that is missing, not JSON, or not {key: {field: value}}; names the file."""


def read_metadata(path: str | os.PathLike) -> dict[str, dict]:
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"metadata file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise MetadataError(f"metadata file {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise MetadataError(f"metadata file {path}: expected an object {{image key: entry}}, got "
                            f"{type(data).__name__}")
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise MetadataError(f"metadata file {path}: entry {key!r} is not an object")
        for field in ("caption", "tags"):
            if field in entry and entry[field] is not None and not isinstance(entry[field], str):
                raise MetadataError(f"metadata file {path}: {key!r}.{field} is not a string")
    return data


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail before any work if `path` exists and --overwrite was not given."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    if path.exists() and path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, expected a .json file path")
    return path


def write_metadata(data: dict[str, dict], path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write UTF-8 JSON (indent 2, non-ASCII kept) to a temporary name, then rename onto `path`."""
    from ..training.checkpoints import atomic_write

    path = check_writable(path, overwrite)
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))
