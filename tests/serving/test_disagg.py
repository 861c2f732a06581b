"""Disaggregated serving behind NVIDIA Dynamo's own frontend: a `--role prefill` worker computes each
prompt and offers its KV pages; the frontend's prefill router hands the offer to a `--role decode`
worker, which pulls the pages (jax.experimental.transfer, across processes) and continues. Real
processes on loopback, asked by the real `openai` client; tokens checked against one engine."""

import time
from pathlib import Path

import numpy as np
import openai
import pytest
import yaml

from meshserve.runtime.engine import Engine, EngineConfig
from meshserve.runtime.sampling import SamplingParams
from meshserve.serving.fleet import LocalFleet, free_port

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny"


@pytest.fixture(scope="module")
def fleet(tiny_ckpt_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disagg")
    config = yaml.safe_load((ROOT / "configs/serving/default.yaml").read_text())
    config["engine"].update(max_seq_len=512, max_num_seqs=8, max_num_batched_tokens=256, max_prefill_chunk=256,
                            prefill_tokens_while_decoding=None, kv_cache_bytes=2**20, host_kv_bytes=0,
                            compilation_cache_dir=str(tmp / "xla"))
    (tmp / "serving.yaml").write_text(yaml.safe_dump(config))
    fleet = LocalFleet(tmp, free_port(), "kv", env={"DYN_LOG": "warn"})
    fleet.config = EngineConfig.from_dict(config["engine"])
    try:
        for role, component in (("prefill", "prefill"), ("decode", "backend")):
            fleet.start_worker(role, ["--model", str(tiny_ckpt_dir), "--config", str(tmp / "serving.yaml"),
                                      "--model-name", MODEL, "--role", role, "--component", component,
                                      "--kv-pull-timeout-s", "3"], timeout=240, metrics=True)
        fleet.client = openai.OpenAI(base_url=f"http://127.0.0.1:{fleet.http_port}/v1", api_key="none",
                                     max_retries=0, timeout=120)
        deadline = time.monotonic() + 60
        while MODEL not in fleet.models():
            assert time.monotonic() < deadline, "the model was never listed"
            time.sleep(0.2)
        yield fleet
    finally:
        fleet.stop()


def test_prompts_prefilled_on_one_worker_decode_on_the_other(fleet, tiny_ckpt):
    engine = Engine(tiny_ckpt, fleet.config)
    rng = np.random.default_rng(4)
    for n in (3, 40, 130):  # within one page; a few pages; more than one page batch of the transfer
        ids = rng.integers(1, 250, n).tolist()
        want = engine.generate([ids], SamplingParams(max_tokens=12, ignore_eos=True))[0]
        out = fleet.client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0,
                                              extra_body={"ignore_eos": True})
        assert out.choices[0].text == want.text, n
        assert out.usage.completion_tokens == 12
    pulled = fleet.metric("decode", 'meshserve_kv_transfers_total{outcome="pulled",role="decode"}')
    offered = fleet.metric("prefill", 'meshserve_kv_transfers_total{outcome="offered",role="prefill"}')
    assert pulled == offered == 3
    pages = (40 - 1) // 16 + (130 - 1) // 16
    assert fleet.metric("decode", "meshserve_kv_transfer_pages_total") == pages
    # the decode worker found those pages in its prefix cache: it computed only the prompts' tails
    assert fleet.metric("decode", 'meshserve_prefix_cache_hit_tokens_total{tier="device"}') == pages * 16
    assert fleet.metric("decode", "meshserve_prompt_tokens_total") == 3 + 40 + 130


def test_the_prefix_the_decode_worker_holds_is_not_pulled(fleet, tiny_ckpt):
    """A 150-token prompt (9 pages to move), then a 300-token one beginning with it (18 pages, in
    arrays of 8): the decode worker holds the first 9 pages, so it pulls only the arrays of pages
    8… (10 pages), and the text is still one engine's."""
    rng = np.random.default_rng(5)
    first = rng.integers(1, 250, 150).tolist()
    longer = first + rng.integers(1, 250, 150).tolist()
    series = {"decode": "meshserve_kv_transfer_pages_total", "prefill": "meshserve_kv_transfer_pages_total"}
    engine = Engine(tiny_ckpt, fleet.config)
    for ids in (first, longer):
        before = {w: fleet.metric(w, s) for w, s in series.items()}
        out = fleet.client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0,
                                              extra_body={"ignore_eos": True})
        want = engine.generate([ids], SamplingParams(max_tokens=6, ignore_eos=True))[0]
        assert out.choices[0].text == want.text
        moved = {w: fleet.metric(w, s) - before[w] for w, s in series.items()}
    assert moved == {"prefill": 18, "decode": 10}

def test_clients_leaving_at_any_point_leave_every_page_free(fleet):
    """100 streams, each cancelled after a random 0-0.6 s: during the remote prefill, during the pull
    or while decoding. Both workers end with no request running and no page in use."""
    import asyncio
    import random

    async def one(client, rng):
        async def run():
            stream = await client.completions.create(
                model=MODEL, prompt=[rng.randrange(1, 250) for _ in range(rng.randrange(20, 140))], max_tokens=64,
                temperature=0, stream=True, extra_body={"ignore_eos": True})
            async for _ in stream:
                pass

        try:
            await asyncio.wait_for(run(), rng.uniform(0, 0.6))
        except (asyncio.TimeoutError, openai.APIError):
            pass

    async def main():
        rng = random.Random(1)
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{fleet.http_port}/v1", api_key="none",
                                      max_retries=0, timeout=120) as client:
            await asyncio.gather(*(one(client, rng) for _ in range(100)))

    asyncio.run(main())
    for worker in ("prefill", "decode"):
        deadline = time.monotonic() + 60
        while not (fleet.metric(worker, "meshserve_requests_running") == 0
                   and fleet.metric(worker, "meshserve_kv_pages_used") == 0):
            assert time.monotonic() < deadline, f"worker {worker} did not free its pages"
            time.sleep(0.2)
    aborted = {w: fleet.metric(w, 'meshserve_requests_total{outcome="abort"}') for w in ("prefill", "decode")}
    assert aborted["decode"] > 5, aborted  # (a prefill takes one step: clients rarely leave during it)
    # and the pair still serves
    out = fleet.client.completions.create(model=MODEL, prompt=[7] * 33, max_tokens=4, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4

def direct(fleet, endpoint: str, request: dict) -> list[dict]:
    """A worker asked directly through Dynamo's own client (no frontend): its chunks."""
    import asyncio
    import os

    async def ask():
        from dynamo.runtime import DistributedRuntime

        runtime = DistributedRuntime(asyncio.get_running_loop(), "file", "tcp", event_plane="zmq")
        try:
            client = await runtime.endpoint(endpoint).client()
            await asyncio.wait_for(client.wait_for_instances(), 30)
            return [chunk.data() async for chunk in await client.generate(request)]
        finally:
            runtime.shutdown()

    saved = dict(os.environ)
    os.environ.update({k: v for k, v in fleet.env.items() if k.startswith("DYN_")})
    try:
        return asyncio.run(ask())
    finally:
        os.environ.clear()
        os.environ.update(saved)


def decode_request(ids: list[int], n: int, offer: dict) -> dict:
    return {"token_ids": ids, "stop_conditions": {"max_tokens": n, "ignore_eos": True},
            "sampling_options": {"temperature": 0.0}, "eos_token_ids": [],
            "prefill_result": {"disaggregated_params": {"meshserve": offer}}}


def test_a_prefill_worker_killed_before_the_pull_costs_a_recomputation_not_the_answer(fleet, tiny_ckpt):
    """The prefill worker offers a prompt's pages and is SIGKILLed; the decode worker, handed that
    offer, fails the pull within its deadline and computes the prompt itself: the answer is one
    engine's, the failure counted."""
    import signal

    ids = list(range(3, 60))
    chunks = direct(fleet, "dynamo.prefill.generate",
                    {"token_ids": ids, "stop_conditions": {"max_tokens": 1}, "sampling_options": {"temperature": 0.0}})
    offer = chunks[-1]["disaggregated_params"]["meshserve"]
    assert len(offer["pages"]["hashes"]) == (len(ids) - 1) // 16
    fleet.workers["prefill"].send_signal(signal.SIGKILL)
    fleet.workers["prefill"].wait(timeout=30)
    failed = 'meshserve_kv_transfers_total{outcome="failed",role="decode"}'
    before = fleet.metric("decode", failed)
    started = time.monotonic()
    tokens = [t for c in direct(fleet, "dynamo.backend.generate", decode_request(ids, 6, offer)) for t in c["token_ids"]]
    want = Engine(tiny_ckpt, fleet.config).generate([ids], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert tokens == list(want.token_ids)
    assert time.monotonic() - started < 60
    assert fleet.metric("decode", failed) == before + 1


def test_a_pull_that_cannot_finish_falls_back_to_computing_the_prompt(fleet, tiny_ckpt):
    """The decode worker asked directly with an offer from a peer that was never there: it gives up
    after its deadline (3 s here), computes the prompt itself, counts the failure, answers
    correctly; and on SIGTERM it still exits 0, though the given-up pulls stay blocked in jax's
    transfer library (which would abort the process at exit)."""
    import signal

    ids = list(range(5, 45))
    want = Engine(tiny_ckpt, fleet.config).generate([ids], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    offer = {"address": f"127.0.0.1:{free_port()}", "uuids": [7],
             "pages": {"hashes": ["00" * 16] * 2, "first": 0, "fingerprint": "f", "shapes": [[8, 4, 16, 2, 8]],
                       "dtype": "float32"}}
    failed = 'meshserve_kv_transfers_total{outcome="failed",role="decode"}'
    before = fleet.metric("decode", failed)
    started = time.monotonic()
    tokens = [t for c in direct(fleet, "dynamo.backend.generate", decode_request(ids, 6, offer)) for t in c["token_ids"]]
    assert tokens == list(want.token_ids)
    assert 3 <= time.monotonic() - started < 60
    assert fleet.metric("decode", failed) == before + 1
    decode = fleet.workers["decode"]
    decode.send_signal(signal.SIGTERM)
    assert decode.wait(timeout=60) == 0
    assert "still blocked at exit" in (fleet.folder / "decode.log").read_text()
