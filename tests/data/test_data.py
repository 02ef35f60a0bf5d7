from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from longcat.data.corpus import DataError, embedded_documents, read_documents
from longcat.data.loader import PackedLoader, TokenStream, sequential_batches
from longcat.data.prepare import load_meta, prepare, split_documents, unigram_entropy


def test_embedded_corpus_has_both_domains() -> None:
    counts: dict[str, int] = {}
    for doc in embedded_documents():
        counts[doc.domain] = counts.get(doc.domain, 0) + 1
    assert counts == {"scripture": 1189, "python_docs": 497}


def test_prepare_writes_shards_split_per_domain(small_data) -> None:
    meta = load_meta(small_data)
    assert set(meta["domains"]) == {"scripture", "python_docs"}
    assert all(info["val_docs"] >= 1 and info["train_docs"] >= 1 for info in meta["domains"].values())
    stream = TokenStream(small_data / "train.bin", meta["dtype"])
    assert len(stream.tokens) == meta["train_tokens"]
    # every document ends in EOS
    ends = np.append(stream.starts[1:], len(stream.tokens)) - 1
    assert np.all(np.asarray(stream.tokens)[ends] == meta["eos_token_id"])
    assert 0 < meta["unigram_entropy"] < np.log(meta["vocab_size"])
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(small_data / "tokenizer.json"))
    assert tok.decode(tok.encode("In the beginning 2024").ids) == "In the beginning 2024"
    assert len(tok.encode("2024").ids) == 4  # digits are split one by one


def test_split_is_order_independent_and_keeps_both_sides() -> None:
    from longcat.data.corpus import Document

    docs = [Document("a", f"t{i}", "x") for i in range(50)] + [Document("b", "only", "y")]
    train, val = split_documents(docs, 0.1)
    train2, val2 = split_documents(list(reversed(docs)), 0.1)
    assert {d.title for d in val["a"]} == {d.title for d in val2["a"]}
    assert any(d.domain == "b" for d in train) and "b" not in val


def test_user_files_and_bad_input(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("hello world")
    (tmp_path / "more.jsonl").write_text(json.dumps({"text": "abc", "domain": "web"}) + "\n")
    docs = list(read_documents([tmp_path]))  # plain text in a folder: the folder is the domain
    assert {(d.domain, d.text) for d in docs} == {(tmp_path.name, "hello world"), ("web", "abc")}
    assert [d.domain for d in read_documents([tmp_path / "notes.txt"])] == ["notes"]
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(DataError, match="bad.jsonl:1"):
        list(read_documents([tmp_path / "bad.jsonl"]))
    with pytest.raises(DataError, match="does not exist"):
        list(read_documents([tmp_path / "missing.txt"]))
    with pytest.raises(DataError, match="not a prepared data directory"):
        load_meta(tmp_path)


def test_bad_files_and_outputs_are_named_and_nothing_is_lost(tmp_path, small_data) -> None:
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        list(read_documents([tmp_path / "latin1.txt"]))
    (tmp_path / "broken.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot be read"):
        list(read_documents([tmp_path / "broken.txt.gz"]))
    (tmp_path / "spaces.jsonl").write_text(json.dumps({"text": "abc", "domain": "livres français"}) + "\n")
    assert [d.domain for d in read_documents([tmp_path / "spaces.jsonl"])] == ["livres français"]
    (tmp_path / "slash.jsonl").write_text(json.dumps({"text": "abc", "domain": "web/en"}) + "\n")
    with pytest.raises(DataError, match="domain 'web/en'"):
        list(read_documents([tmp_path / "slash.jsonl"]))
    # an existing directory that is not prepared data is never replaced
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    (tmp_path / "a.txt").write_text("In the beginning. " * 50)
    with pytest.raises(DataError, match="not a prepared data directory"):
        prepare(precious, inputs=[str(tmp_path / "a.txt")], tokenizer_path=small_data / "tokenizer.json")
    assert (precious / "thesis.tex").read_text() == "years of work"
    with pytest.raises(DataError, match="val_fraction"):
        prepare(tmp_path / "out", inputs=[str(tmp_path / "a.txt")], val_fraction=1)
    # a failed prepare leaves no temporary directory behind
    with pytest.raises(DataError):
        prepare(tmp_path / "out", inputs=[str(tmp_path / "a.txt")], tokenizer_path=tmp_path / "a.txt")
    assert not (tmp_path / "out.tmp").exists() and not (tmp_path / "out").exists()


def test_repeated_titles_split_document_by_document() -> None:
    from longcat.data.corpus import Document

    docs = [Document("books", "chapter", f"text {i}") for i in range(400)]
    train, val = split_documents(docs, 0.1)
    assert 10 < len(val["books"]) < 80 and len(train) + len(val["books"]) == 400
    two = [Document("d", "alpha", "x"), Document("d", "beta", "y")]
    assert split_documents(two, 0.01)[1] == split_documents(two[::-1], 0.01)[1]  # not by input order


def test_prepare_with_given_tokenizer(tmp_path, small_data) -> None:
    (tmp_path / "a.txt").write_text("In the beginning God created the heaven and the earth. " * 20)
    (tmp_path / "b.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    meta = prepare(tmp_path / "out", inputs=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
                   tokenizer_path=small_data / "tokenizer.json")  # fmt: skip
    assert meta["vocab_size"] == load_meta(small_data)["vocab_size"]


def test_unigram_entropy() -> None:
    assert unigram_entropy(np.array([0, 1, 0, 1]), 4) == pytest.approx(np.log(2))


def test_loader_resumes_exactly_and_masks_documents(small_data) -> None:
    meta = load_meta(small_data)
    stream = TokenStream(small_data / "train.bin", meta["dtype"])
    a = PackedLoader(stream, seq_len=32, batch_size=4, seed=3)
    for _ in range(5):
        a.next_batch()
    b = PackedLoader(stream, seq_len=32, batch_size=4, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(3 * a.num_windows // 4):  # crosses an epoch boundary
        x, y = a.next_batch(), b.next_batch()
        assert torch.equal(x.input_ids, y.input_ids)
    batch = a.next_batch()
    assert torch.equal(batch.targets[:, :-1], batch.input_ids[:, 1:])
    assert torch.equal(batch.next_targets, batch.targets[:, 1:])
    # positions restart where a new document starts
    eos = meta["eos_token_id"]
    for row in range(batch.input_ids.shape[0]):
        ids, pos, doc = batch.input_ids[row], batch.position_ids[row], batch.document_ids[row]
        for t in range(1, ids.numel()):
            if ids[t - 1] == eos:
                assert pos[t] == 0 and doc[t] == doc[t - 1] + 1
            else:
                assert pos[t] == pos[t - 1] + 1 and doc[t] == doc[t - 1]
    with pytest.raises(DataError, match="differs from the checkpoint"):
        PackedLoader(stream, seq_len=16, batch_size=4, seed=3).load_state_dict(a.state_dict())
    assert sum(1 for _ in sequential_batches(stream, 32, 4, max_batches=2)) == 2


def test_text_files_without_a_suffix_are_read_and_skipped_files_named(tmp_path, small_data, capsys) -> None:
    """A folder of licence texts named GPL-3, Apache-2.0, ... is a domain like any other; a binary file
    beside them is skipped and named (in meta.json and by the CLI), never dropped silently."""
    import gzip

    from longcat.cli import main

    licences = tmp_path / "inputs" / "licences"
    licences.mkdir(parents=True)
    for name in ("GPL-3", "Apache-2.0", "MIT", "BSD-3-Clause"):
        (licences / name).write_text(f"The {name} licence. Permission is hereby granted. " * 20)
    (licences / "LGPL.gz").write_bytes(gzip.compress(b"The LGPL licence, compressed. " * 20))
    (licences / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    (licences / "latin1").write_bytes("licence fran\xe7aise".encode("latin-1"))
    skipped: list = []
    docs = list(read_documents([tmp_path / "inputs"], skipped))
    assert sorted(d.title for d in docs) == sorted(
        f"licences/{n}" for n in ("GPL-3", "Apache-2.0", "MIT", "BSD-3-Clause", "LGPL.gz")
    )
    assert {d.domain for d in docs} == {"licences"}
    assert sorted(p.name for p, _ in skipped) == ["latin1", "logo.png"]
    assert all("not UTF-8 text" in why for _, why in skipped)
    out = tmp_path / "prepared"
    args = ["data", "prepare", "--input", str(tmp_path / "inputs"), "--out", str(out), "--val-fraction", "0.2",
            "--tokenizer", str(small_data / "tokenizer.json")]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "logo.png: not UTF-8 text" in err and "latin1: not UTF-8 text" in err
    meta = load_meta(out)
    assert meta["domains"]["licences"]["train_docs"] + meta["domains"]["licences"]["val_docs"] == 5
    assert sorted(Path(item["path"]).name for item in meta["skipped_files"]) == ["latin1", "logo.png"]
    with pytest.raises(DataError, match="not UTF-8 text"):  # a file named directly must be text
        list(read_documents([licences / "logo.png"]))
