"""Pieces every study composes: corpus + tokenizer resolution with on-disk reuse."""

from __future__ import annotations

import logging
from pathlib import Path

from interp.data.text import (
    Corpus,
    TokenizedCorpus,
    builtin_corpus,
    load_hf_text,
    load_text_files,
    load_tokenizer,
    tokenize_corpus,
    train_tokenizer,
)
from interp.errors import ModelLoadError

log = logging.getLogger(__name__)


def resolve_corpus(spec: str) -> Corpus:
    """'builtin', a local text file, a local data file or directory, or an HF dataset id."""
    if spec in ("builtin", "shakespeare"):
        return builtin_corpus()
    path = Path(spec)
    if path.suffix in (".txt", ".md") or (path.exists() and path.is_file() and not path.suffix):
        return load_text_files(path)
    return load_hf_text(spec)


def load_corpus_and_tokenizer(
    corpus_spec: str, vocab_size: int, run_dir: str | Path, tokenizer_spec: str | None = None
) -> tuple[Corpus, object, TokenizedCorpus]:
    """Resolve the corpus, train (or reuse) its tokenizer, tokenize with a cache in ``run_dir``.

    ``tokenizer_spec`` (an HF id or directory) replaces the trained BPE, e.g. for HF models.
    """
    run_dir = Path(run_dir)
    corpus = resolve_corpus(corpus_spec)
    if tokenizer_spec is not None:
        tok = load_tokenizer(tokenizer_spec)
    else:
        tok_dir = run_dir / f"tokenizer-{corpus.name}-{corpus.fingerprint}-{vocab_size}"
        tok = None
        if (tok_dir / "tokenizer.json").is_file():
            try:
                tok = load_tokenizer(tok_dir)
            except ModelLoadError as e:  # the run's own cached BPE: retrain it, lose nothing
                log.warning("cached tokenizer in %s is damaged (%s); training it again",
                            tok_dir, e)
        if tok is None:
            tok = train_tokenizer(corpus, vocab_size, tok_dir)
    tokens = tokenize_corpus(corpus, tok, cache_dir=run_dir / "cache")
    return corpus, tok, tokens
