"""interp.io: atomic writes (no temp files left, normal permissions) and reads that raise the
caller's error type naming the file, without touching it."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

import interp.io as io_mod
from interp.errors import CheckpointError, DataError, InterpError, MaskError
from interp.io import (
    atomic_write_bytes,
    atomic_write_text,
    read_bytes,
    read_json,
    read_tensors,
    read_text,
    require_keys,
    save_tensors,
    write_json,
)


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _fingerprint(path: Path) -> tuple:
    """What a read must leave unchanged: the bytes, size, mode and modification time."""
    st = path.stat()
    return path.read_bytes(), st.st_size, st.st_mode, st.st_mtime_ns


# --------------------------------------------------------------------------- writing


def test_atomic_write_replaces_the_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "a.bin"  # missing parent folders are created
    assert atomic_write_bytes(target, b"first") == target
    assert target.read_bytes() == b"first"
    atomic_write_bytes(target, b"second, longer than the first")
    assert target.read_bytes() == b"second, longer than the first"
    assert atomic_write_text(tmp_path / "sub" / "t.txt", "héllo\n").read_bytes() == \
        "héllo\n".encode()
    assert _listing(tmp_path / "sub") == ["a.bin", "t.txt"]


def test_atomic_write_gives_normal_permissions(tmp_path):
    """mkstemp creates 0600 files; the written file has the mode a plain open() would give."""
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    written = atomic_write_bytes(tmp_path / "atomic", b"x")
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~io_mod._UMASK
    assert stat.S_IMODE(written.stat().st_mode) & 0o044  # readable by others (umask 022/002)


@pytest.mark.parametrize("fail_in", ["fsync", "replace"])
def test_failed_write_keeps_the_old_file_and_removes_the_temp_file(tmp_path, monkeypatch,
                                                                    fail_in):
    target = tmp_path / "state.json"
    write_json(target, {"version": 1})
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io_mod.os, fail_in, boom)
    with pytest.raises(OSError, match="No space left"):
        write_json(target, {"version": 2, "big": list(range(1000))})
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert _listing(tmp_path) == ["state.json"]  # no .state.json.*.tmp left behind


def test_interrupted_write_of_a_new_file_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt  # BaseException: Ctrl-C in the middle of a write

    monkeypatch.setattr(io_mod.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(tmp_path / "new.txt", "x" * 10_000)
    monkeypatch.undo()
    assert _listing(tmp_path) == []


def test_write_json_is_strict_json(tmp_path):
    obj = {"nan": math.nan, "inf": [1.0, math.inf, -math.inf], "np": np.float32(0.5),
           "int": np.int64(3), "arr": np.array([1.0, np.nan]), "path": Path("a/b"),
           "nested": {"x": (1, 2)}}
    path = write_json(tmp_path / "x.json", obj)
    text = path.read_text()
    assert text.endswith("}\n") and "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"nan": None, "inf": [1.0, None, None], "np": 0.5, "int": 3,
                                "arr": [1.0, None], "path": "a/b", "nested": {"x": [1, 2]}}
    assert read_json(path) == json.loads(text)
    with pytest.raises(TypeError, match="object"):
        write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()


def test_save_tensors_round_trip(tmp_path):
    t = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3).T,  # non-contiguous
         "b": torch.tensor([True, False])}
    path = save_tensors(tmp_path / "t.safetensors", t, metadata={"lam": 0.5})
    back = read_tensors(path, required=["a", "b"])
    assert set(back) == {"a", "b"}
    torch.testing.assert_close(back["a"], t["a"])
    assert back["b"].tolist() == [True, False]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"lam": "0.5"}
    assert _listing(tmp_path) == ["t.safetensors"]


# --------------------------------------------------------------------------- reading


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = save_tensors(tmp_path / "good.safetensors", {"w": torch.ones(64, 64)})
    data = good.read_bytes()
    files = {
        "empty": tmp_path / "empty.json",
        "truncated_json": tmp_path / "trunc.json",
        "not_json": tmp_path / "prose.json",
        "list_json": tmp_path / "list.json",
        "latin1": tmp_path / "latin1.txt",
        "truncated_tensors": tmp_path / "trunc.safetensors",
        "foreign_tensors": tmp_path / "foreign.safetensors",
        "directory": tmp_path / "a_dir.json",
    }
    files["empty"].write_bytes(b"")
    files["truncated_json"].write_text('{"steps": 10, "loss": [1.0, 2.')
    files["not_json"].write_text("steps = 10\n")
    files["list_json"].write_text("[1, 2, 3]\n")
    files["latin1"].write_bytes("café".encode("latin-1"))
    files["truncated_tensors"].write_bytes(data[: len(data) // 2])
    files["foreign_tensors"].write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    files["directory"].mkdir()
    return files


READERS = {
    "read_bytes": lambda p, **kw: read_bytes(p, **kw),
    "read_text": lambda p, **kw: read_text(p, **kw),
    "read_json": lambda p, **kw: read_json(p, **kw),
    "read_tensors": lambda p, **kw: read_tensors(p, **kw),
}

# (reader, file kind, words the message must contain)
CASES = [
    *[(r, "missing", "does not exist") for r in READERS],
    *[(r, "empty", "is empty") for r in READERS],
    *[(r, "directory", "is a directory") for r in READERS],
    ("read_text", "latin1", "not UTF-8"),
    ("read_json", "latin1", "not UTF-8"),
    ("read_json", "truncated_json", "not valid JSON"),
    ("read_json", "not_json", "not valid JSON"),
    ("read_json", "list_json", "holds a JSON list, not a dict"),
    ("read_tensors", "truncated_tensors", "truncated or not a safetensors file"),
    ("read_tensors", "foreign_tensors", "truncated or not a safetensors file"),
    ("read_tensors", "truncated_json", "truncated or not a safetensors file"),
]


@pytest.mark.parametrize("error", [DataError, CheckpointError, MaskError])
@pytest.mark.parametrize(("reader", "kind", "words"), CASES)
def test_bad_file_raises_the_callers_error_naming_the_file(tmp_path, reader, kind, words,
                                                           error):
    files = _bad_files(tmp_path)
    path = files.get(kind, tmp_path / "missing.json")
    before = _fingerprint(path) if path.is_file() else None
    listing = _listing(tmp_path)
    with pytest.raises(error) as info:
        READERS[reader](path, error=error, what="Mask file", fix="Delete it and rerun.")
    msg = str(info.value)
    assert isinstance(info.value, InterpError)
    assert str(path) in msg and msg.startswith("Mask file ") and words in msg, msg
    assert msg.endswith("Delete it and rerun."), msg
    # the failed read left everything as it was
    assert _listing(tmp_path) == listing
    if before is not None:
        assert _fingerprint(path) == before


def test_default_error_is_data_error_and_a_json_error_says_where(tmp_path):
    path = tmp_path / "trunc.json"
    path.write_text('{\n  "steps": 10,\n  "loss": [1.0, 2.')
    with pytest.raises(DataError, match=r"line 3") as info:
        read_json(path)
    assert isinstance(info.value, ValueError)  # DataError is also a ValueError
    assert info.value.__cause__ is not None  # the JSONDecodeError is chained, not lost
    with pytest.raises(DataError, match="does not exist. Check the path."):
        read_json(tmp_path / "nope.json")


def test_reads_that_succeed(tmp_path):
    (tmp_path / "e.txt").write_bytes(b"")
    assert read_bytes(tmp_path / "e.txt", allow_empty=True) == b""
    assert read_text(tmp_path / "e.txt", allow_empty=True) == ""
    (tmp_path / "l.json").write_text("[1, 2]")
    assert read_json(tmp_path / "l.json", expect=list) == [1, 2]
    assert read_json(tmp_path / "l.json", expect=None) == [1, 2]
    (tmp_path / "u.txt").write_text("naïve ✓", encoding="utf-8")
    assert read_text(tmp_path / "u.txt") == "naïve ✓"


def test_missing_tensor_names_the_first_and_counts_the_rest(tmp_path):
    path = save_tensors(tmp_path / "m.safetensors", {"a": torch.zeros(2)})
    before = _fingerprint(path)
    with pytest.raises(MaskError) as info:
        read_tensors(path, error=MaskError, required=["a", "b", "c"])
    msg = str(info.value)
    assert str(path) in msg and "no tensor 'b'" in msg and "(and 1 more missing)" in msg
    assert _fingerprint(path) == before


def test_require_keys(tmp_path):
    obj = {"a": 1, "b": 2}
    assert require_keys(obj, ["a", "b"], tmp_path / "x.json") is obj
    with pytest.raises(CheckpointError) as info:
        require_keys(obj, ["a", "step", "loss"], tmp_path / "x.json", error=CheckpointError,
                     what="Checkpoint index", fix="Delete the run directory.")
    msg = str(info.value)
    assert msg == (f"Checkpoint index {str(tmp_path / 'x.json')!r} has no 'step' entry. "
                   "Delete the run directory.")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.json"
    path.write_text("{}")
    path.chmod(0)
    try:
        with pytest.raises(DataError, match="cannot be read") as info:
            read_json(path)
        assert str(path) in str(info.value)
    finally:
        path.chmod(0o644)
