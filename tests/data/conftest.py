"""Helpers for the data tests: images generated with PIL in tmp dirs."""
from __future__ import annotations

import pytest
from PIL import Image


def _write_image(path, size=(32, 32), colour=(90, 90, 90)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture()
def write_image():
    """write_image(path, size=(w, h), colour=(r, g, b)) -> path"""
    return _write_image
