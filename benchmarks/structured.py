"""Structured outputs on CPU, default model, one run: what a grammar costs, and whether every output holds.

Cost: 16 concurrent requests (chat prompts, temperature 1, 128 new tokens each) decoding with every
row constrained by a JSON schema (an array of at least 20 person objects: nested objects, enums,
bounded strings and numbers, so no output ends before 128 tokens) against the same requests
unconstrained (ignore_eos, so they run 128 tokens too): output tokens/s, the median of --repeats
runs each, and the ratio. Also the host time a constrained step spends filling masks.
Validity: --seeds seeds × each kind of constraint (tests/helpers.guided_cases: a JSON schema with
nested objects, arrays and enums; any JSON object; a regex; a choice; a Lark grammar) at temperature
1: how many outputs parse and validate (jsonschema, re) and end with EOS or the grammar's end.

    .venv/bin/python benchmarks/structured.py [--repeats 3] [--seeds 50] [--concurrent 16] [--max-tokens 1024]
                                              [--validity-only]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import source_tree  # meshserve from this checkout when not installed

sys.path.append(str(source_tree.ROOT))  # tests.helpers: the constraints and their checks

NEW = 128


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=1024, help="of each output in the validity runs")
    ap.add_argument("--validity-only", action="store_true")
    args = ap.parse_args()

    import jax

    from meshserve.models.checkpoint import load_checkpoint
    from meshserve.models.default import default_checkpoint
    from meshserve.runtime import grammar as grammar_module
    from meshserve.runtime.engine import Engine, EngineConfig
    from meshserve.runtime.grammar import Guided
    from meshserve.runtime.sampling import SamplingParams
    from meshserve.serving.versions import describe
    from tests.helpers import PERSON_SCHEMA, guided_cases

    ckpt = load_checkpoint(default_checkpoint(), progress=False)
    engine = Engine(ckpt, EngineConfig(max_seq_len=2048, max_num_seqs=64, kv_cache_bytes=2**29))
    tok = ckpt.tokenizer
    topics = ["a team roster", "the people in a story", "guests at a party", "members of a club"]
    prompts = [tok.encode_chat([{"role": "user", "content": f"List {topics[i % len(topics)]} as JSON, #{i}."}])
               for i in range(args.concurrent)]
    many = Guided.json_schema({"type": "array", "items": PERSON_SCHEMA, "minItems": 20})

    fill_time = [0.0]
    real_fill = grammar_module.fill_masks

    def timed_fill(*a, **kw):
        t0 = time.perf_counter()
        try:
            return real_fill(*a, **kw)
        finally:
            fill_time[0] += time.perf_counter() - t0

    import meshserve.runtime.runner as runner_module
    runner_module.fill_masks = timed_fill

    def run(guided) -> tuple[float, int, float]:
        params = [SamplingParams(max_tokens=NEW, temperature=1.0, seed=i, ignore_eos=guided is None, guided=guided)
                  for i in range(args.concurrent)]
        fill_time[0] = 0.0
        t0 = time.perf_counter()
        out = engine.generate(prompts, params)
        wall = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for c in out)
        return tokens / wall, tokens, fill_time[0]

    rows = {"unconstrained": [], "JSON schema": []}
    if not args.validity_only:
        run(None), run(many)  # warm: the grammar's compile and the first steps
    for _ in range(0 if args.validity_only else args.repeats):
        rows["unconstrained"].append(run(None))
        rows["JSON schema"].append(run(many))

    valid = []
    for name, guided, check in guided_cases():
        params = [SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=s, guided=guided)
                  for s in range(args.seeds)]
        t0 = time.perf_counter()
        outs = engine.generate([tok.encode_chat([{"role": "user", "content": "Answer in the requested format."}])]
                               * args.seeds, params)
        ok = ended = 0
        for out in outs:
            ended += out.finish_reason == "stop"
            try:
                check(out.text)
                ok += 1
            except Exception:
                pass
        valid.append((name, ok, ended, statistics.median(len(o.token_ids) for o in outs), time.perf_counter() - t0))

    print(f"ran on: {describe()}; {jax.devices()[0].device_kind}")
    if not args.validity_only:
        base = statistics.median(r[0] for r in rows["unconstrained"])
        print(f"\n{args.concurrent} concurrent requests, {NEW} new tokens each, temperature 1, median of "
              f"{args.repeats}:")
        print("| rows | output tok/s | vs unconstrained | mask filling, s per run |")
        print("|---|---|---|---|")
        for name, results in rows.items():
            rate = statistics.median(r[0] for r in results)
            fill = statistics.median(r[2] for r in results)
            print(f"| {name} | {rate:.1f} | {rate / base:.2f} | {fill:.3f} |")
    print(f"\n{args.seeds} seeds per kind, temperature 1, at most {args.max_tokens} tokens:")
    print("| constraint | valid | ended by EOS or the grammar | median tokens | seconds |")
    print("|---|---|---|---|---|")
    for name, ok, ended, median, secs in valid:
        print(f"| {name} | {ok}/{args.seeds} | {ended}/{args.seeds} | {median:.0f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
