"""The `meshserve` command line.

    meshserve convert --from gguf:FILE | hf:DIR --out CKPT_DIR [--dtype bfloat16|float32]
    meshserve generate [--model CKPT_DIR] [--chat] [sampling options] "prompt"
    meshserve fetch-default [--dtype ...]     fetch and convert the default model, print its folder

Errors the user can fix are printed as one line on stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from models.errors import MeshserveError

EXIT_ERROR = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshserve", description="LLM inference on JAX/XLA")
    sub = p.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="import a GGUF file or HF folder into a checkpoint")
    conv.add_argument("--from", dest="source", required=True, metavar="gguf:FILE|hf:DIR")
    conv.add_argument("--out", required=True, metavar="CKPT_DIR")
    conv.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))

    gen = sub.add_parser("generate", help="stream a completion to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--model", metavar="CKPT_DIR",
                     help="checkpoint folder (default: the default model, fetched on first use)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--max-seq-len", type=int, default=4096, help="KV cache length")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")

    fetch = sub.add_parser("fetch-default", help="fetch and convert the default model; print its folder")
    fetch.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    return p


def _convert(args) -> None:
    from models.convert import convert

    out = convert(args.source, args.out, dtype=args.dtype)
    print(f"wrote {out}", file=sys.stderr)


def _generate(args) -> None:
    from models.checkpoint import load_checkpoint
    from models.default import default_checkpoint
    from runtime import sampling
    from runtime.generate import DenseGenerator

    sampling.validate(args.temperature, args.top_p, args.max_tokens)  # before the slow load
    folder = args.model or default_checkpoint(progress=not args.quiet)
    ckpt = load_checkpoint(folder, progress=not args.quiet)
    tok = ckpt.tokenizer
    if args.chat:
        ids = tok.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        ids = tok.encode(args.prompt)
    generator = DenseGenerator(ckpt, max_seq_len=args.max_seq_len)
    detok = tok.incremental_decoder()
    for tid in generator.stream(ids, max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed):
        sys.stdout.write(detok.push(tid))
        sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")


def _fetch_default(args) -> None:
    from models.default import default_checkpoint

    print(default_checkpoint(dtype=args.dtype))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"convert": _convert, "generate": _generate, "fetch-default": _fetch_default}[args.command]
    try:
        handler(args)
    except MeshserveError as e:
        print(f"meshserve: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
