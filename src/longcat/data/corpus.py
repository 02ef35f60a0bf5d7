"""Documents: the embedded corpus (two domains, see corpus/LICENSES.md) and users' own files.

A user file is JSON Lines (`.jsonl`: one document per line, its text under "text" and optionally
its domain under "domain") or plain text (one document per file): any file that decodes as UTF-8
and holds no NUL byte, whatever its name (`README`, `GPL-3`, `notes.txt`), may be compressed
(`.gz`, `.xz`); suffixes match in any case. A directory is read recursively, skipping hidden files;
files in it that are not text are skipped and named in the list the caller passes, never dropped
silently. Domains name validation files, so they cannot hold a path separator.
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


class DataError(ValueError):
    """An input file or prepared data directory is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Document:
    domain: str
    title: str
    text: str


def _open_text(path: Path):  # noqa: ANN202 - a text stream
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _base_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    return Path(path.stem).suffix.lower() if suffix in (".gz", ".xz") else suffix


def _checked_domain(domain: str, where: str) -> str:
    """A domain names its validation file (val.<domain>.bin), so it cannot hold a path separator."""
    if not domain or domain in (".", "..") or any(c in domain for c in "/\\\0"):
        raise DataError(
            f"{where}: domain {domain!r} cannot be empty, '.', '..' or hold '/', '\\' or NUL (it names a file)"
        )
    return domain


def _lines(path: Path) -> Iterator[str]:
    """The file's lines (a whole plain-text file is read through here too); reading errors named."""
    try:
        with _open_text(path) as handle:
            yield from handle
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}); convert it, e.g. iconv -f latin1 -t utf-8") from err
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise DataError(f"{path} cannot be read ({err})") from err


def _read_jsonl(path: Path, default_domain: str) -> Iterator[Document]:
    for number, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number} is not valid JSON ({err})") from err
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f'{path}:{number} needs a "text" string field')
        domain = _checked_domain(str(row.get("domain", default_domain)), f"{path}:{number}")
        yield Document(domain, str(row.get("title", f"{path.name}:{number}")), row["text"])


def embedded_documents() -> Iterator[Document]:
    for domain, name in EMBEDDED_DOMAINS.items():
        yield from _read_jsonl(CORPUS_DIR / name, domain)


def _plain_text(path: Path) -> str | None:
    """The file's text if it is UTF-8 text (no NUL byte), else None; unreadable files are errors."""
    try:
        with _open_text(path) as handle:
            text = handle.read()
    except UnicodeDecodeError:
        return None
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise DataError(f"{path} cannot be read ({err})") from err
    return None if "\0" in text else text


def read_documents(paths: list[str | os.PathLike], skipped: list[tuple[Path, str]] | None = None) -> Iterator[Document]:
    """Documents from files and directories. Default domains: a JSONL file's name without suffixes; for
    plain-text files (one document each) the folder holding them inside a directory input, so that a
    folder of books is one domain with documents to hold out, and the file's name for a file input.
    Files inside a directory that are not UTF-8 text are appended to `skipped` with the reason; a file
    named directly must be text."""
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"input {path} does not exist")
        if path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.parts[len(path.parts) :])
            )
        else:
            files = [path]
        for file in files:
            stem = file.name.split(".")[0]
            if _base_suffix(file) == ".jsonl":
                yield from _read_jsonl(file, stem)
                continue
            text = _plain_text(file)
            if text is None:
                why = "not UTF-8 text (binary, or another encoding: convert it, e.g. iconv -f latin1 -t utf-8)"
                if not path.is_dir():
                    raise DataError(f"input {file} is {why}; give UTF-8 text files or .jsonl (optionally .gz/.xz)")
                if skipped is not None:
                    skipped.append((file, why))
                continue
            folder = (path.resolve() / file.relative_to(path)).parent.name if path.is_dir() else stem
            domain = _checked_domain(folder, str(file))
            yield Document(domain, str(file.relative_to(path)) if path.is_dir() else file.name, text)
