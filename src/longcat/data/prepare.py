"""`longcat data prepare`: a tokenizer and memory-mapped token shards with a held-out split per domain.

Output directory:
    tokenizer.json, tokenizer_config.json   byte-level BPE (HF tokenizers), or the one given
    train.bin, train.idx.npy                all training documents, shuffled, each ending in EOS;
                                            idx holds each document's start offset
    val.<domain>.bin, val.<domain>.idx.npy  held-out documents of each domain
    meta.json                               vocabulary, dtype, counts, unigram entropy

Documents go to the validation split by a hash of their domain and title, so the split does not
depend on the order of the inputs; each domain keeps at least one document on each side.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .corpus import DataError, Document, embedded_documents, read_documents

SPECIAL_TOKENS = ["<pad>", "<longcat_s>", "</longcat_s>"]  # ids 0, 1, 2: pad, bos, eos (LongCat's bos/eos)
FORMAT_VERSION = 1


def train_tokenizer(texts: Iterable[str], vocab_size: int):  # noqa: ANN201 - tokenizers.Tokenizer
    """Byte-level BPE with single-digit splitting (paper §2.4: numbers are split into digits)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def write_tokenizer_config(out: Path, max_length: int) -> None:
    """What transformers' AutoTokenizer needs beside tokenizer.json, and LongCat's chat template."""
    from ..inference.chat_template import LONGCAT_CHAT_TEMPLATE

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[1],
        "eos_token": SPECIAL_TOKENS[2],
        "pad_token": SPECIAL_TOKENS[0],
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": LONGCAT_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def copy_tokenizer(files: list[Path], directory: Path) -> None:
    """Copy files into a checkpoint directory; a tokenizer_config.json without a chat template
    (data prepared before templates were written) gets LongCat's, so every checkpoint renders chats
    and tools alike in our server and in transformers."""
    from ..inference.chat_template import LONGCAT_CHAT_TEMPLATE

    for file in files:
        if file.name != "tokenizer_config.json":
            shutil.copy2(file, directory / file.name)
            continue
        config = json.loads(file.read_text())
        config.setdefault("chat_template", LONGCAT_CHAT_TEMPLATE)
        (directory / file.name).write_text(json.dumps(config, indent=2) + "\n")


def _split_key(doc: Document, repeated_title: bool) -> float:
    """A uniform number in [0, 1) from the document's domain and title (and its text where the title
    repeats in the domain, so that documents sharing a title are split one by one)."""
    text = f"\0{hashlib.sha1(doc.text.encode()).hexdigest()}" if repeated_title else ""
    digest = hashlib.sha1(f"{doc.domain}\0{doc.title}{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], dict[str, list[Document]]]:
    train: list[Document] = []
    val: dict[str, list[Document]] = {}
    by_domain: dict[str, list[Document]] = {}
    for doc in docs:
        by_domain.setdefault(doc.domain, []).append(doc)
    for domain, items in by_domain.items():
        titles = Counter(d.title for d in items)
        keys = {id(d): _split_key(d, titles[d.title] > 1) for d in items}
        held = [d for d in items if keys[id(d)] < val_fraction]  # both sides keep the input order
        kept = [d for d in items if keys[id(d)] >= val_fraction]
        # a domain of two or more documents keeps one on each side, chosen by key, not by input order
        if len(items) >= 2 and not held:
            moved = min(kept, key=lambda d: keys[id(d)])
            held, kept = [moved], [d for d in kept if d is not moved]
        if not kept:
            moved = max(held, key=lambda d: keys[id(d)])
            kept, held = [moved], [d for d in held if d is not moved]
        train.extend(kept)
        if held:
            val[domain] = held
    return train, val


def _encode(tokenizer, docs: list[Document], eos: int) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    encoded = tokenizer.encode_batch([d.text for d in docs])
    lengths = np.array([len(e.ids) + 1 for e in encoded], dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    tokens = np.empty(int(lengths.sum()), dtype=np.int64)
    for start, enc in zip(starts, encoded):
        tokens[start : start + len(enc.ids)] = enc.ids
        tokens[start + len(enc.ids)] = eos
    return tokens, starts


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy in nats of the token frequencies: the loss of the best model that ignores context."""
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def prepare(
    out_dir: str | os.PathLike,
    inputs: list[str] | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    vocab_size: int = 4096,
    val_fraction: float = 0.02,
    seed: int = 0,
) -> dict:
    """Tokenize `inputs` (default: the embedded corpus) into `out_dir`; returns the metadata."""

    out = Path(out_dir).resolve()
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "meta.json").is_file())):
        raise DataError(
            f"{out} exists and is not a prepared data directory; pick a new or empty --out (it is replaced whole)"
        )
    skipped: list[tuple[Path, str]] = []
    docs = list(embedded_documents() if not inputs else read_documents(inputs, skipped))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        named = "".join(f"; skipped {path}: {why}" for path, why in skipped[:5])
        raise DataError(f"no non-empty documents in {inputs}{named}")
    train_docs, val_docs = split_documents(docs, val_fraction)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = _write_prepared(tmp, train_docs, val_docs, tokenizer_path, vocab_size, seed, inputs, skipped)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return meta


def _write_prepared(
    tmp: Path, train_docs, val_docs, tokenizer_path, vocab_size: int, seed: int, inputs, skipped
) -> dict:  # noqa: ANN001, PLR0913, E501
    from tokenizers import Tokenizer

    if tokenizer_path is None:
        tokenizer = train_tokenizer((d.text for d in train_docs), vocab_size)
    else:
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as err:
            raise DataError(f"{tokenizer_path} is not a tokenizers tokenizer.json ({err})") from err
    vocab = tokenizer.get_vocab_size()
    eos = tokenizer.token_to_id(SPECIAL_TOKENS[2])
    if eos is None:
        raise DataError(f"the tokenizer has no {SPECIAL_TOKENS[2]} token; add it as a special token")
    tokenizer.save(str(tmp / "tokenizer.json"))
    write_tokenizer_config(tmp, max_length=1 << 20)
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32

    random.Random(seed).shuffle(train_docs)
    tokens, starts = _encode(tokenizer, train_docs, eos)
    tokens.astype(dtype).tofile(tmp / "train.bin")
    np.save(tmp / "train.idx.npy", starts)
    domains: dict[str, dict] = {}
    for doc in train_docs:
        domains.setdefault(doc.domain, {"train_docs": 0, "val_docs": 0, "val_tokens": 0})["train_docs"] += 1
    for domain, items in val_docs.items():
        val_tokens, val_starts = _encode(tokenizer, items, eos)
        val_tokens.astype(dtype).tofile(tmp / f"val.{domain}.bin")
        np.save(tmp / f"val.{domain}.idx.npy", val_starts)
        domains[domain].update(val_docs=len(items), val_tokens=int(val_tokens.size))
    meta = {
        "format": FORMAT_VERSION,
        "vocab_size": vocab,
        "dtype": np.dtype(dtype).name,
        "eos_token_id": eos,
        "bos_token_id": tokenizer.token_to_id(SPECIAL_TOKENS[1]),
        "pad_token_id": tokenizer.token_to_id(SPECIAL_TOKENS[0]),
        "train_tokens": int(tokens.size),
        "train_docs": len(train_docs),
        "domains": domains,
        "unigram_entropy": unigram_entropy(tokens, vocab),
        "unigram_entropy_bits": unigram_entropy(tokens, vocab) / math.log(2),
        "sources": inputs or ["embedded"],
        "skipped_files": [{"path": str(path), "reason": why} for path, why in skipped],
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_meta(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{data_dir} is not a prepared data directory (no meta.json); run `longcat data prepare`")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise DataError(f"{path} has format {meta.get('format')}, expected {FORMAT_VERSION}; prepare the data again")
    return meta
