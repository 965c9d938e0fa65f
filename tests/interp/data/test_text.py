import numpy as np
import pytest
import torch

from interp.data.text import (
    builtin_corpus,
    clean_play_markdown,
    iterate_batches,
    load_hf_text,
    load_text_files,
    to_sequences,
    tokenize_corpus,
)
from interp.errors import DataError


def test_builtin_corpus_split_is_deterministic_and_disjoint():
    a, b = builtin_corpus(), builtin_corpus()
    assert a.train == b.train and a.validation == b.validation
    assert len(a.train) == 35 and len(a.validation) == 3
    assert set(a.meta["train_plays"]).isdisjoint(a.meta["validation_plays"])
    assert not set(a.train) & set(a.validation)
    text = "".join(a.train)
    assert "**" not in text and "## " not in text  # markup is gone
    assert "Fair is foul, and foul is fair" in "".join(a.validation)  # Macbeth validates


def test_clean_play_markdown_keeps_speakers_and_lines():
    md = "# Play\n\n## ACT I\n\n_Enter A_\n\n**A**  \nHello there,  \nfriend.\n\n_Exit_\n"
    assert clean_play_markdown(md) == "A:\nHello there,\nfriend.\n"


def test_tokenizer_round_trip(shakespeare):
    corpus, tok, _ = shakespeare
    sample = corpus.validation[0][:2000]
    assert tok.decode(tok(sample, add_special_tokens=False)["input_ids"]) == sample
    assert len(tok) == 512 and tok.bos_token_id == 0


def test_tokenize_cache_hit_equals_fresh(shakespeare, tmp_path):
    corpus, tok, cached = shakespeare
    fresh = tokenize_corpus(corpus, tok, cache_dir=tmp_path)
    again = tokenize_corpus(corpus, tok, cache_dir=tmp_path)
    assert torch.equal(fresh.train, cached.train) and torch.equal(again.validation, fresh.validation)
    assert len(list(tmp_path.glob("*.npz"))) == 1


def test_batches_deterministic_and_resumable():
    tokens = torch.arange(1000)
    full = list(iterate_batches(tokens, 4, 10, seed=3, epochs=3))
    assert len(full) == 3 * (100 // 4)
    resumed = list(iterate_batches(tokens, 4, 10, seed=3, epochs=3, start=30))
    assert all(torch.equal(x, y) for x, y in zip(full[30:], resumed, strict=True))
    assert to_sequences(tokens, 10).shape == (100, 10)


def test_text_files_and_hf_dataset(tmp_path):
    import datasets

    f = tmp_path / "a.txt"
    f.write_text("line one\nline two\nline three\nline four\n" * 10)
    c = load_text_files(f, validation_fraction=0.25)
    assert c.train[0] + c.validation[0] == f.read_text()
    ds = datasets.Dataset.from_dict({"text": [f"document {i}" for i in range(10)]})
    c2 = load_hf_text(ds)
    assert c2.train == [f"document {i}" for i in range(9)] and c2.validation == ["document 9"]
    c3 = load_hf_text(str(f))  # a local text file through datasets
    assert "line one" in c3.train[0]


def test_bad_corpus_input_is_explained(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_text_files(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(DataError, match="empty"):
        load_text_files(empty)
    with pytest.raises(DataError, match="column"):
        import datasets

        load_hf_text(datasets.Dataset.from_dict({"body": ["x", "y"]}))
    with pytest.raises(DataError, match="fewer than one sequence"):
        to_sequences(torch.arange(5), 10)


# --------------------------------------------------------------------------- damaged inputs


def _snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _raises_naming(error, path, fn, *args, match=None, **kwargs):
    before = _snapshot(path.parent)
    with pytest.raises(error, match=match) as info:
        fn(*args, **kwargs)
    assert str(path) in str(info.value)
    assert _snapshot(path.parent) == before
    return str(info.value)


def test_text_files_missing_empty_or_not_utf8(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("some text\n" * 5)
    _raises_naming(DataError, tmp_path / "missing.txt", load_text_files,
                   [good, tmp_path / "missing.txt"], match="does not exist")
    zero = tmp_path / "zero.txt"
    zero.write_bytes(b"")
    _raises_naming(DataError, zero, load_text_files, [good, zero], match="empty")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 5)
    _raises_naming(DataError, latin, load_text_files, latin, match="not UTF-8")
    sub = tmp_path / "folder"
    sub.mkdir()
    _raises_naming(DataError, sub, load_text_files, sub, match="is a directory")
    with pytest.raises(DataError, match="No corpus files"):
        load_text_files([])


def test_hf_text_missing_empty_or_unreadable(tmp_path):
    import datasets

    _raises_naming(DataError, tmp_path / "nope.jsonl", load_hf_text, tmp_path / "nope.jsonl",
                   match="does not exist")
    _raises_naming(DataError, tmp_path / "nope", load_hf_text, str(tmp_path / "nope"),
                   match="does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    _raises_naming(DataError, empty, load_hf_text, empty, match="is empty")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": "b\n')
    _raises_naming(DataError, broken, load_hf_text, broken, match="Could not read dataset")
    blank = datasets.Dataset.from_dict({"text": ["  ", None, "\n"]})
    with pytest.raises(DataError, match="no text: column 'text' is blank in all 3 rows"):
        load_hf_text(blank)
    numbers = datasets.Dataset.from_dict({"text": [1, 2, 3]})
    with pytest.raises(DataError, match="holds int values, not text"):
        load_hf_text(numbers)
    c = load_hf_text(datasets.Dataset.from_dict({"text": ["a b", None, "c d", "e f"]}))
    assert c.train == ["a b", "c d"] and c.validation == ["e f"]  # None rows are blank


def test_corrupt_tokenizer_files_are_named(tiny_tokenizer, tmp_path):
    from interp.data.text import load_tokenizer
    from interp.errors import ModelLoadError

    tok_dir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(str(tok_dir))
    assert len(load_tokenizer(tok_dir)) == len(tiny_tokenizer)
    data = (tok_dir / "tokenizer.json").read_bytes()
    (tok_dir / "tokenizer.json").write_bytes(data[: len(data) // 3])
    _raises_naming(ModelLoadError, tok_dir / "tokenizer.json", load_tokenizer, tok_dir,
                   match="not valid JSON.*Delete the directory")
    (tok_dir / "tokenizer.json").write_bytes(b"")
    _raises_naming(ModelLoadError, tok_dir / "tokenizer.json", load_tokenizer, tok_dir,
                   match="is empty")
    empty_dir = tmp_path / "no-tokenizer"
    empty_dir.mkdir()
    (empty_dir / "notes.txt").write_text("x")
    _raises_naming(ModelLoadError, empty_dir, load_tokenizer, empty_dir,
                   match="holds no tokenizer")
    _raises_naming(ModelLoadError, tmp_path / "missing", load_tokenizer, tmp_path / "missing",
                   match="does not exist")


@pytest.mark.parametrize("damage", [
    lambda b: b"",
    lambda b: b[: len(b) // 2],
    lambda b: b"garbage, not a zip archive",
])
def test_corrupt_token_cache_is_rebuilt_with_a_warning(tiny_tokenizer, tmp_path, caplog, damage):
    from interp.data.text import Corpus

    corpus = Corpus("toy", ["Fair is foul, and foul is fair.\n" * 20],
                    ["When shall we three meet again?\n" * 5])
    fresh = tokenize_corpus(corpus, tiny_tokenizer)
    first = tokenize_corpus(corpus, tiny_tokenizer, cache_dir=tmp_path)
    (cache,) = tmp_path.glob("*.npz")
    cache.write_bytes(damage(cache.read_bytes()))
    with caplog.at_level("WARNING", logger="interp.data.text"):
        again = tokenize_corpus(corpus, tiny_tokenizer, cache_dir=tmp_path)
    assert any("token cache" in r.message and cache.name in r.message for r in caplog.records)
    for got in (first, again):
        assert torch.equal(got.train, fresh.train)
        assert torch.equal(got.validation, fresh.validation)
    with np.load(cache) as z:  # rebuilt whole (bytes differ: zip entries carry a time)
        assert np.array_equal(z["train"], fresh.train.numpy())
    caplog.clear()
    with caplog.at_level("WARNING", logger="interp.data.text"):
        tokenize_corpus(corpus, tiny_tokenizer, cache_dir=tmp_path)
    assert not caplog.records  # a good cache is used silently
