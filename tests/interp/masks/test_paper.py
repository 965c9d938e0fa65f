"""The bigram paper's pickle format (interp/masks/paper.py): damaged files raise MaskError
naming the file, and reading never changes them. Round trips and the safe unpickler are
tested against real models in test_maskset.py."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from torch import nn

from interp.errors import MaskError
from interp.masks import MaskSet, load_paper_masks
from interp.masks import maskset as maskset_module


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _pickle(tmp_path):
    path = tmp_path / "mask.pkl"
    arr = np.random.default_rng(0).random((4, 3)) > 0.5
    path.write_bytes(pickle.dumps({"w": arr, "orig_model_name": "m"}, protocol=4))
    return path


@pytest.mark.parametrize("damage, problem", [
    (lambda b: b"", "is empty"),
    (lambda b: b[: len(b) // 2], "truncated or not a pickle"),
    (lambda b: b[:-1], "truncated or not a pickle"),  # no STOP opcode
    (lambda b: b"not a pickle", "not a readable mask pickle"),
])
def test_damaged_pickle(tmp_path, damage, problem):
    path = _pickle(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    before = _snapshot(tmp_path)
    for read in (load_paper_masks, lambda p: MaskSet.import_paper(p, nn.Linear(2, 2))):
        with pytest.raises(MaskError, match=problem) as info:
            read(path)
        assert str(path) in str(info.value)
    assert _snapshot(tmp_path) == before


def test_missing_pickle_and_directory(tmp_path):
    with pytest.raises(MaskError, match="does not exist") as info:
        load_paper_masks(tmp_path / "nope.pkl")
    assert "nope.pkl" in str(info.value)
    with pytest.raises(MaskError, match="is a directory"):
        load_paper_masks(tmp_path)


def test_refusals_name_the_file(tmp_path):
    path = tmp_path / "f.pkl"
    path.write_bytes(pickle.dumps({"w": np.ones(2, np.float32)}))
    with pytest.raises(MaskError, match="not a boolean numpy array") as info:
        load_paper_masks(path)
    assert str(path) in str(info.value)
    path.write_bytes(pickle.dumps({"w": np.ones(2, bool), "x": print}))
    with pytest.raises(MaskError, match=r"Refusing to load builtins\.print") as info:
        load_paper_masks(path)
    assert str(path) in str(info.value)


def test_load_paper_masks_is_importable_from_its_old_places(tmp_path):
    path = _pickle(tmp_path)
    assert maskset_module.load_paper_masks is load_paper_masks
    got = load_paper_masks(path)
    assert got["orig_model_name"] == "m" and got["w"].dtype == np.bool_


def test_orig_model_name_must_be_a_name(tmp_path):
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps({"w": np.ones(2, bool), "orig_model_name": np.ones(1, bool)}))
    with pytest.raises(MaskError, match="'orig_model_name' is a ndarray, not a model name"):
        load_paper_masks(path)
    path.write_bytes(pickle.dumps({"w": np.ones(2, bool)}))  # the name is optional
    assert set(load_paper_masks(path)) == {"w"}
