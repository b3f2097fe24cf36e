"""Loading a base model from a local diffusers folder, offline; clear errors for bad paths."""
from __future__ import annotations

import pytest
import torch

from hcpdiff_like.models.loading import ModelLoadError, detect_family, load_model_bundle


def test_local_folder_loads_offline(tiny_sd1):
    bundle = load_model_bundle(str(tiny_sd1))
    assert bundle.family == "sd1"
    assert bundle.tokenizer("a cat")["input_ids"][0] == bundle.tokenizer.bos_token_id


@pytest.mark.parametrize("fixture, family", [("tiny_sd1", "sd1"), ("tiny_sd2", "sd2"), ("tiny_sdxl", "sdxl")])
def test_family_detected_from_folder(request, fixture, family):
    assert detect_family(request.getfixturevalue(fixture)) == family


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match=str(tmp_path / "nowhere")):
        load_model_bundle(str(tmp_path / "nowhere"))


def test_folder_without_model_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        load_model_bundle(str(tmp_path))


def test_tiny_model_is_deterministic(tmp_path):
    from hcpdiff_like.models.tiny import build_tiny_components

    first, second = build_tiny_components("sd1", seed=3), build_tiny_components("sd1", seed=3)
    for a, b in zip(first["unet"].parameters(), second["unet"].parameters()):
        assert torch.equal(a, b)
