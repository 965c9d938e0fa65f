"""Mask-set files (interp/masks/files.py): every damaged file raises MaskError naming it, and a
failed load leaves the files as they were."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from interp.errors import MaskError
from interp.masks import MODES, MaskSet


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))


def _saved(tmp_path):
    net = _net()
    ms = MaskSet.for_model(net, targets={"a": (net[0], "weight"), "b": (net[2], "weight")})
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ms.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    path = ms.save(tmp_path / "m")
    return net, ms, path, tmp_path / "m.json"


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _fails(path_named, directory, *args, match=None):
    """MaskSet.load(*args) raises MaskError naming ``path_named``; the directory is unchanged."""
    before = _snapshot(directory)
    with pytest.raises(MaskError, match=match) as info:
        MaskSet.load(*args)
    assert str(path_named) in str(info.value)
    assert _snapshot(directory) == before
    return str(info.value)


def _edit_sidecar(side, fn):
    data = json.loads(side.read_text())
    fn(data)
    side.write_text(json.dumps(data))


def test_round_trip_of_a_custom_module(tmp_path):
    net, ms, path, _ = _saved(tmp_path)
    for model in (None, net):
        back = MaskSet.load(path, model, targets=None if model is None else
                            {"a": (net[0], "weight"), "b": (net[2], "weight")})
        assert back.names == ["a", "b"]
        assert all(torch.equal(back.logits[n], ms.logits[n]) for n in ms.names)


@pytest.mark.parametrize("content, problem", [
    (b"", "empty"),
    (None, "truncated"),          # first half of the real file
    (b"\x00" * 64, "truncated or not a safetensors file"),
])
def test_damaged_tensor_file(tmp_path, content, problem):
    _, _, path, _ = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content is None else content)
    _fails(path, tmp_path, path, match=problem)


def test_missing_files(tmp_path):
    _, _, path, side = _saved(tmp_path)
    side.unlink()
    _fails(side, tmp_path, path, match="does not exist")
    _, _, path, side = _saved(tmp_path)
    path.unlink()
    _fails(path, tmp_path, path, match="does not exist")


@pytest.mark.parametrize("content, problem", [
    ("", "empty"),
    ('{"format": "interp.maskset", "targets": [', "not valid JSON"),
    ("[1, 2]", "JSON list, not a dict"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_damaged_sidecar(tmp_path, content, problem):
    _, _, path, side = _saved(tmp_path)
    if isinstance(content, bytes):
        side.write_bytes(content)
    else:
        side.write_text(content)
    _fails(side, tmp_path, path, match=problem)


@pytest.mark.parametrize("key", ["targets", "kind", "format"])
def test_sidecar_without_a_key(tmp_path, key):
    _, _, path, side = _saved(tmp_path)
    _edit_sidecar(side, lambda d: d.pop(key))
    _fails(side, tmp_path, path, match=f"has no '{key}' entry")


@pytest.mark.parametrize("key", ["shape", "name", "module_path"])
def test_sidecar_target_without_a_key(tmp_path, key):
    _, _, path, side = _saved(tmp_path)
    _edit_sidecar(side, lambda d: d["targets"][1].pop(key))
    _fails(side, tmp_path, path, match=rf"target 1.*has no '{key}' entry")


def test_sidecar_of_another_format_kind_or_mode(tmp_path):
    _, _, path, side = _saved(tmp_path)
    _edit_sidecar(side, lambda d: d.update(format="something.else"))
    _fails(side, tmp_path, path, match="not an interp mask-set sidecar")
    _, _, path, side = _saved(tmp_path)
    _edit_sidecar(side, lambda d: d["kind"].update(name="no_such_kind"))
    _fails(side, tmp_path, path, match="Unknown mask kind")
    _, _, path, side = _saved(tmp_path)
    _edit_sidecar(side, lambda d: d.update(targets="a, b"))
    _fails(side, tmp_path, path, match="not a list")
    _, _, path, side = _saved(tmp_path)
    _edit_sidecar(side, lambda d: d.update(mode="sideways"))
    _fails(side, tmp_path, path, match="modes are")


def test_tensors_that_disagree_with_the_sidecar(tmp_path):
    _, ms, path, side = _saved(tmp_path)
    save_file({"a": ms.logits["a"].detach(), "allowed/a": ms.allowed["a"]}, str(path))
    _fails(path, tmp_path, path, match="has no tensor 'b'")
    _, ms, path, side = _saved(tmp_path)
    _edit_sidecar(side, lambda d: d["targets"][0].update(shape=[6, 5]))
    _fails(path, tmp_path, path, match=r"'a' has shape \(5, 6\) but its sidecar says \(6, 5\)")


def test_hard_is_no_longer_a_mode_but_old_files_load_as_keep(tmp_path):
    assert "hard" not in MODES and "keep" in MODES
    net, ms, path, side = _saved(tmp_path)
    with pytest.raises(MaskError, match="modes are"):
        ms.mode = "hard"
    _edit_sidecar(side, lambda d: d.update(mode="hard"))  # written by an older version
    back = MaskSet.load(path)
    assert back.mode == "keep"
    x = torch.randn(2, 6)
    with ms.applied(net, "keep"):
        expected = net(x)
    with back.applied(net, "keep"):
        torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
