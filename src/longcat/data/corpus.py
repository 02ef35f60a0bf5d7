"""Documents: the embedded corpus (two domains, see corpus/LICENSES.md) and users' own files.

A user file is plain text (`.txt`, `.md`, `.rst`: one document per file) or JSON Lines (`.jsonl`:
one document per line, its text under "text" and optionally its domain under "domain"); any of them
may be compressed (`.gz`, `.xz`). A directory is read recursively.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
EMBEDDED_DOMAINS = {"scripture": "scripture.jsonl.xz", "python_docs": "python_docs.jsonl.xz"}
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}


class DataError(ValueError):
    """An input file or prepared data directory is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Document:
    domain: str
    title: str
    text: str


def _open_text(path: Path):  # noqa: ANN202 - a text stream
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _base_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix in (".gz", ".xz") else path.suffix


def _read_jsonl(path: Path, default_domain: str) -> Iterator[Document]:
    with _open_text(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number} is not valid JSON ({err})") from err
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f'{path}:{number} needs a "text" string field')
            yield Document(
                str(row.get("domain", default_domain)), str(row.get("title", f"{path.name}:{number}")), row["text"]
            )


def embedded_documents() -> Iterator[Document]:
    for domain, name in EMBEDDED_DOMAINS.items():
        yield from _read_jsonl(CORPUS_DIR / name, domain)


def read_documents(paths: list[str | os.PathLike]) -> Iterator[Document]:
    """Documents from files and directories; the domain defaults to the file's name without suffixes."""
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"input {path} does not exist")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            suffix = _base_suffix(file)
            domain = file.name.split(".")[0]
            if suffix == ".jsonl":
                yield from _read_jsonl(file, domain)
            elif suffix in TEXT_SUFFIXES:
                with _open_text(file) as handle:
                    yield Document(domain, file.name, handle.read())
            elif not path.is_dir():
                raise DataError(f"input {file}: unknown kind; use .txt/.md/.rst or .jsonl (optionally .gz/.xz)")
