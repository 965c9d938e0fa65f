"""Corpus and tokenizer resolution shared by the studies."""

from __future__ import annotations

from analyses.studies.common import load_corpus_and_tokenizer


def test_a_damaged_cached_tokenizer_is_trained_again(tmp_path, small_corpus_file, caplog):
    """The run's own BPE is a cache: a damaged copy is retrained (the same tokenizer), not a
    dead end."""
    corpus, tok, tokens = load_corpus_and_tokenizer(str(small_corpus_file), 300, tmp_path)
    tok_file = next(tmp_path.glob("tokenizer-*/tokenizer.json"))
    data = tok_file.read_bytes()
    tok_file.write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING"):
        _, tok2, tokens2 = load_corpus_and_tokenizer(str(small_corpus_file), 300, tmp_path)
    assert "damaged" in caplog.text
    assert tok_file.read_bytes() == data
    assert tok2.get_vocab() == tok.get_vocab() and (tokens2.train == tokens.train).all()
