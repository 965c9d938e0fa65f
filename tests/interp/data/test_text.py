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
