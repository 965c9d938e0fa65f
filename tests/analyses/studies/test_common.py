"""Corpus and tokenizer resolution shared by the studies."""

from __future__ import annotations

import pytest

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



def test_run_parallel_keeps_order_and_raises_a_jobs_error():
    from analyses.studies.common import run_parallel

    # builtins as jobs: the spawned workers need not import this test module
    jobs = [(pow, (i, 2)) for i in range(5)]
    assert run_parallel(jobs, workers=1) == [0, 1, 4, 9, 16]
    assert run_parallel(jobs, workers=2) == [0, 1, 4, 9, 16]
    with pytest.raises(ValueError, match="invalid literal"):
        run_parallel(jobs + [(int, ("x",))], workers=2)


def test_resolve_workers():
    from analyses.studies.common import resolve_workers
    from interp.errors import ConfigError

    assert resolve_workers(4, jobs=2) == 2
    assert resolve_workers(1, jobs=5) == 1
    assert resolve_workers(0, jobs=1) == 1
    assert 1 <= resolve_workers(0, jobs=64) <= 64
    assert resolve_workers(4, jobs=3, device="cuda") == 1
    with pytest.raises(ConfigError, match="workers"):
        resolve_workers(-1, jobs=2)
