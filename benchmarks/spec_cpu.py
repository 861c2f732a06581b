"""Speculative decoding on CPU, default model, one run: each method against no speculation.

Repetitive (batch 1): chat prompts whose answer repeats or edits text given in the prompt ("Repeat
exactly: …", "Fix the spelling: …"), greedy, --new tokens at most; decode tokens/s (first token to
last) of each request alone, median over the prompts and --repeats runs, with and without n-gram
speculation. The outputs must be the same token for token (greedy): the script says if not.
Chat mix (--concurrent, 16): chat questions whose answers do not repeat them, greedy, 128 new tokens
(ignore_eos): output tokens/s of the whole batch, median of --repeats; the batch-size cut-off keeps
speculation off while more than `disable_by_batch_size` requests run.
Acceptance: drafts proposed and accepted, the mean acceptance length (1 + accepted / verify rows,
as vLLM counts it) and acceptance per draft position.
Draft model: --draft CHECKPOINT (default: the default model itself — SmolLM2's smallest is 135M, so
no smaller model shares its tokenizer: the figures are then acceptance's upper bound at the cost of a
draft as large as the target) on the first --draft-prompts chat prompts alone, against none.

    .venv/bin/python benchmarks/spec_cpu.py [--repeats 3] [--new 256] [--concurrent 16] [--k 8] [--lookup-min 1]
                                            [--draft CHECKPOINT] [--draft-prompts 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import source_tree  # noqa: F401  (meshserve from this checkout when not installed)

TEXT = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly "
    "quick daft zebras jump. The five boxing wizards jump quickly. Sphinx of black quartz, judge my vow.",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to "
    "synthesize foods from carbon dioxide and water. It generally involves the green pigment chlorophyll "
    "and generates oxygen as a by-product.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result\n",
    "Dear team, the quarterly review meeting has been moved from Tuesday to Thursday at ten in the morning. "
    "Please bring your updated project reports and budget estimates. Lunch will be provided afterwards.",
]
ASKS = ["Repeat exactly the following text, with no other words:\n\n{}",
        "Fix the spelling mistakes in this text and give it back whole:\n\n{}"]
CHAT = ["Write a short poem about the sea.", "What should I cook for dinner tonight?",
        "Explain how a bicycle works.", "Tell me a story about a brave mouse.",
        "Why do cats purr?", "Give me three tips for learning a language.",
        "What is the capital of France and what is it known for?", "Describe a sunset in the mountains.",
        "How do airplanes stay in the air?", "Invent a new board game.", "What makes music sound happy?",
        "Plan a weekend trip to the countryside.", "Describe your ideal library.",
        "What are the benefits of walking every day?", "Write a haiku about autumn.",
        "Explain what a black hole is to a child."]


def misspell(text: str) -> str:
    return text.replace("the ", "teh ").replace("quick", "quikc").replace("process", "proccess")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=256, help="new tokens at most per repetitive request")
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--k", type=int, default=8, help="num_speculative_tokens")
    ap.add_argument("--lookup-min", type=int, default=1, help="prompt_lookup_min")
    ap.add_argument("--draft", help="the draft model's checkpoint (default: the default model)")
    ap.add_argument("--draft-prompts", type=int, default=4)
    args = ap.parse_args()

    import jax

    from meshserve.models.checkpoint import load_checkpoint
    from meshserve.models.default import default_checkpoint
    from meshserve.runtime.engine import Engine, EngineConfig
    from meshserve.runtime.sampling import SamplingParams
    from meshserve.runtime.speculative import SpeculativeConfig
    from meshserve.serving.versions import describe

    ckpt = load_checkpoint(default_checkpoint(), progress=False)
    tok = ckpt.tokenizer
    base = EngineConfig(max_seq_len=2048, max_num_seqs=args.concurrent, kv_cache_bytes=2**29)
    spec_config = SpeculativeConfig(method="ngram", num_speculative_tokens=args.k, prompt_lookup_max=4,
                                    prompt_lookup_min=args.lookup_min, disable_by_batch_size=4)
    engines = {"none": Engine(ckpt, base), "ngram": Engine(ckpt, dataclasses.replace(base, speculative=spec_config))}
    draft_path = args.draft or str(default_checkpoint())
    draft_name = args.draft or "the default model itself"
    draft_config = dataclasses.replace(spec_config, method="draft_model", model=draft_path, num_speculative_tokens=4)
    drafted = Engine(ckpt, dataclasses.replace(base, speculative=draft_config))

    repetitive = [tok.encode_chat([{"role": "user", "content": ask.format(misspell(text) if i else text)}])
                  for i, ask in enumerate(ASKS) for text in TEXT]
    chat = [tok.encode_chat([{"role": "user", "content": q}]) for q in CHAT[:args.concurrent]]

    def alone(engine, prompt) -> tuple[list[int], float]:
        """(tokens, decode tok/s: first token to last) of one request alone."""
        engine.add_request(prompt, SamplingParams(max_tokens=args.new))
        tokens, first, last = [], None, None
        while engine.has_unfinished:
            for out in engine.step():
                tokens += out.token_ids
                now = time.perf_counter()
                first = first or now
                last = now
        return tokens, (len(tokens) - 1) / (last - first) if len(tokens) > 1 else 0.0

    def batch(engine) -> float:
        params = SamplingParams(max_tokens=128, ignore_eos=True)
        t0 = time.perf_counter()
        out = engine.generate(chat, [params] * len(chat))
        return sum(len(c.token_ids) for c in out) / (time.perf_counter() - t0)

    for engine in engines.values():  # warm: the first steps of each program
        alone(engine, repetitive[0])
        batch(engine)
    spec = engines["ngram"].speculator
    counts0 = (spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens, spec.accepted_per_position.copy())

    rates = {name: [] for name in engines}
    outputs = {name: {} for name in engines}
    for _ in range(args.repeats):
        for i, prompt in enumerate(repetitive):
            for name, engine in engines.items():
                tokens, rate = alone(engine, prompt)
                rates[name].append(rate)
                outputs[name][i] = tokens
    drafts, proposed, accepted = (a - b for a, b in zip((spec.num_drafts, spec.num_draft_tokens,
                                                         spec.num_accepted_tokens), counts0))
    per_position = spec.accepted_per_position - counts0[3]
    same = sum(outputs["none"][i] == outputs["ngram"][i] for i in outputs["none"])
    mixed = {name: [] for name in engines}
    spec_before = spec.num_drafts
    for _ in range(args.repeats):
        for name, engine in engines.items():
            mixed[name].append(batch(engine))
    batch_drafts = spec.num_drafts - spec_before

    alone(drafted, chat[0])  # warm
    d = drafted.speculator
    d0 = (d.num_drafts, d.num_draft_tokens, d.num_accepted_tokens)
    draft_rates = {"none": [], "draft_model": []}
    draft_same = 0
    for _ in range(args.repeats):
        for prompt in chat[:args.draft_prompts]:
            plain_tokens, rate = alone(engines["none"], prompt)
            draft_rates["none"].append(rate)
            tokens, rate = alone(drafted, prompt)
            draft_rates["draft_model"].append(rate)
            draft_same += tokens == plain_tokens
    d_drafts, d_proposed, d_accepted = (a - b for a, b in zip((d.num_drafts, d.num_draft_tokens,
                                                               d.num_accepted_tokens), d0))

    print(f"ran on: {describe()}; {jax.devices()[0].device_kind}")
    n_tokens = statistics.median(len(t) for t in outputs["none"].values())
    r0, r1 = statistics.median(rates["none"]), statistics.median(rates["ngram"])
    print(f"\nRepetitive prompts at batch 1 ({len(repetitive)} prompts × {args.repeats}, greedy, median "
          f"{n_tokens:.0f} new tokens; k = {args.k}, prompt lookup {args.lookup_min}…4 tokens):")
    print("| speculation | decode tok/s (median) | vs none |")
    print("|---|---|---|")
    print(f"| none | {r0:.1f} | 1.00 |")
    print(f"| ngram | {r1:.1f} | {r1 / r0:.2f} |")
    print(f"greedy outputs identical: {same}/{len(repetitive)}")
    print(f"drafts: {drafts} verify rows, {proposed} tokens proposed, {accepted} accepted "
          f"({accepted / max(proposed, 1):.2f}); mean acceptance length {1 + accepted / max(drafts, 1):.2f}; "
          f"accepted at position 1…{args.k}: {[round(int(a) / max(drafts, 1), 2) for a in per_position]}")
    m0, m1 = statistics.median(mixed["none"]), statistics.median(mixed["ngram"])
    print(f"\nChat mix, {len(chat)} concurrent, 128 new tokens each (median of {args.repeats}):")
    print("| speculation | output tok/s | vs none |")
    print("|---|---|---|")
    print(f"| none | {m0:.1f} | 1.00 |")
    print(f"| ngram | {m1:.1f} | {m1 / m0:.2f} |")
    print(f"verify rows in the chat-mix runs: {batch_drafts} (speculation only once at most "
          f"{spec_config.disable_by_batch_size} requests run)")
    n0, n1 = statistics.median(draft_rates["none"]), statistics.median(draft_rates["draft_model"])
    print(f"\nDraft model: {draft_name} (k = 4), chat prompts alone ({args.draft_prompts} × {args.repeats}, greedy):")
    print("| speculation | decode tok/s (median) | vs none |")
    print("|---|---|---|")
    print(f"| none | {n0:.1f} | 1.00 |")
    print(f"| draft_model | {n1:.1f} | {n1 / n0:.2f} |")
    print(f"greedy outputs identical: {draft_same}/{args.draft_prompts * args.repeats}; drafts: {d_drafts} verify "
          f"rows, {d_proposed} proposed, {d_accepted} accepted ({d_accepted / max(d_proposed, 1):.2f}); mean "
          f"acceptance length {1 + d_accepted / max(d_drafts, 1):.2f}")


if __name__ == "__main__":
    main()
