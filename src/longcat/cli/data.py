"""`longcat data prepare`: a tokenizer and token shards with a held-out split per domain."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from ..data.prepare import prepare
    from ..training.trainer import default_data_dir

    out = Path(args.out) if args.out else default_data_dir()
    meta = prepare(out, inputs=args.input, tokenizer_path=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, seed=args.seed)  # fmt: skip
    print(f"prepared {out}: {meta['train_tokens']:,} training tokens, vocabulary {meta['vocab_size']}, "
          f"unigram entropy {meta['unigram_entropy']:.3f} nats")  # fmt: skip
    for domain, info in meta["domains"].items():
        print(f"  {domain}: {info['train_docs']} training documents, {info['val_docs']} held out "
              f"({info['val_tokens']:,} tokens)")  # fmt: skip
    for item in meta.get("skipped_files", []):
        print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
    bare = [domain for domain, info in meta["domains"].items() if not info["val_docs"]]
    if bare:
        print(f"note: {', '.join(bare)} held out nothing (one document, or too few for --val-fraction), so "
              "training reports no validation loss for them; plain-text files in one folder form one domain",
              file=sys.stderr)  # fmt: skip
    return 0


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
    data = sub.add_parser("data", help="prepare training data").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="train a tokenizer and write token shards with a validation split")
    prep.add_argument("--out", help="output directory (default: the cache used by `longcat train`)")
    prep.add_argument("--input", nargs="+", help="text/JSONL files or directories (default: the embedded corpus)")
    prep.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    prep.add_argument("--vocab-size", type=int, default=4096)
    prep.add_argument("--val-fraction", type=float, default=0.02)
    prep.add_argument("--seed", type=int, default=0)
    prep.set_defaults(func=run)
