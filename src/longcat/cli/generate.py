"""`longcat generate`: text from a checkpoint, greedy or sampled, optionally with MTP speculation."""

from __future__ import annotations

import argparse
import sys

from ..inference.generate import GenerationError


def run(args: argparse.Namespace) -> int:
    import time

    from ..checkpoint import resolve_checkpoint_dir
    from ..inference.chat import CheckpointTokenizer
    from ..inference.generate import GenerationStats
    from ..model.lm import LongcatForCausalLM
    from ..serving.detokenize import TextStream

    if args.system is not None and not args.chat:
        raise GenerationError("--system only applies with --chat; add --chat or drop --system")
    if args.draft_tokens is not None and not args.speculative:
        raise GenerationError("--draft-tokens only applies with --speculative; add --speculative or drop it")
    for flag, value in (("--temperature", args.temperature), ("--top-k", args.top_k), ("--top-p", args.top_p)):
        if value is not None and not args.sample:
            raise GenerationError(f"{flag} only applies with --sample (greedy decoding ignores it); add --sample")
    root = resolve_checkpoint_dir(args.checkpoint)  # a local directory, or a Hub id downloaded once
    tokenizer = CheckpointTokenizer(root)  # before the weights: a missing tokenizer fails fast
    model = LongcatForCausalLM.from_pretrained(root).eval()
    text = args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        text = tokenizer.chat(messages)
    ids = tokenizer.encode(text)
    if not ids:
        raise GenerationError("the prompt is empty: pass some text with --prompt")
    stats = GenerationStats()
    temperature = 1.0 if args.temperature is None else args.temperature
    kwargs = dict(
        max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, speculative="mtp" if args.speculative else None,
        num_draft_tokens=1 if args.draft_tokens is None else args.draft_tokens, stats=stats, compile=args.compile,
    )  # fmt: skip
    start = time.perf_counter()
    new: list[int] = []
    text = TextStream(tokenizer.decode)  # the server's incremental detokenizer: a window, not the whole output
    for chunk in model.stream_generate([ids], **kwargs):
        new.extend(chunk[0].tolist())
        if args.stream:
            sys.stdout.write(text.push(chunk[0].tolist()))
            sys.stdout.flush()
    elapsed = time.perf_counter() - start
    print(text.finish() if args.stream else tokenizer.decode(new))
    if args.stats:
        rate = stats.new_tokens / max(elapsed, 1e-9)
        line = f"{stats.prompt_tokens} prompt tokens; {stats.new_tokens} tokens in {elapsed:.2f}s ({rate:.1f} tokens/s)"
        if args.compile:
            line += " including the first call's compilation"
        if args.speculative:
            line += (
                f"; MTP acceptance {stats.acceptance_rate:.1%}, {stats.tokens_per_forward:.2f} tokens per main forward"
            )
        print(line, file=sys.stderr)
    return 0


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
    gen = sub.add_parser("generate", help="generate text from a checkpoint")
    gen.add_argument("checkpoint", help="a checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat format")
    gen.add_argument("--system", help="system prompt for --chat")
    gen.add_argument("--stream", action="store_true", help="print tokens as they come")
    gen.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    gen.add_argument("--draft-tokens", type=int, help="MTP draft tokens per round (default 1; with --speculative)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, help="with --sample: softmax temperature, > 0 (default 1)")
    gen.add_argument("--top-k", type=int, help="with --sample: keep the k most likely tokens")
    gen.add_argument("--top-p", type=float, help="with --sample: keep the smallest set of tokens with this mass")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stats", action="store_true", help="print speed (and MTP acceptance) to stderr")
    gen.add_argument("--compile", action="store_true", help="torch.compile the decode steps (slow first call)")
    gen.set_defaults(func=run)
