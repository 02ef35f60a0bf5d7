"""Rebuild the embedded corpus in src/longcat/data/corpus/ from Debian packages.

    apt-get update && apt-get download bible-kjv-text bible-kjv python3.11-doc
    for f in *.deb; do dpkg-deb -x "$f" extracted; done
    python scripts/build_corpus.py extracted

Writes one JSON document per line, xz-compressed: scripture.jsonl.xz (one document per chapter of the
King James Bible, verse references stripped) and python_docs.jsonl.xz (one document per reStructuredText
source of the Python 3.11 documentation).
"""

from __future__ import annotations

import json
import lzma
import re
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src" / "longcat" / "data" / "corpus"


def scripture(root: Path) -> list[dict]:
    text = subprocess.run(
        [str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "-m", "8192", "gen1:1-rev22:21"],
        check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL,  # it reads a tty otherwise
    ).stdout  # fmt: skip
    docs, title, verses = [], None, []
    for line in text.splitlines():
        if re.fullmatch(r"\S.* \d+", line):  # chapter heading, e.g. "Genesis 1"
            if title:
                docs.append({"title": title, "text": "\n".join(verses) + "\n"})
            title, verses = line, []
        elif match := re.match(r"\s+\d+ (.*)", line):  # a verse: strip its number
            verses.append(match.group(1).strip())
        elif line.strip() and verses:  # wrapped continuation of the previous verse
            verses[-1] += " " + line.strip()
    docs.append({"title": title, "text": "\n".join(verses) + "\n"})
    return docs


def python_docs(root: Path) -> list[dict]:
    base = root / "usr/share/doc/python3.11/html/_sources"
    return [
        {"title": str(path.relative_to(base)).removesuffix(".rst.txt"), "text": path.read_text(encoding="utf-8")}
        for path in sorted(base.rglob("*.rst.txt"))
    ]


def write(name: str, docs: list[dict]) -> None:
    data = "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs).encode()
    (OUT / name).write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    print(f"{name}: {len(docs)} documents, {len(data) / 1e6:.1f} MB of text")


if __name__ == "__main__":
    root = Path(sys.argv[1])
    OUT.mkdir(parents=True, exist_ok=True)
    write("scripture.jsonl.xz", scripture(root))
    write("python_docs.jsonl.xz", python_docs(root))
