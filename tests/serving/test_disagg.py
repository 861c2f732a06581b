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
    fleet.model_dir = tiny_ckpt_dir
    try:
        for role, component in (("prefill", "prefill"), ("decode", "backend")):
            fleet.start_worker(role, ["--model", str(tiny_ckpt_dir), "--config", str(tmp / "serving.yaml"),
                                      "--model-name", MODEL, "--role", role, "--component", component,
                                      "--kv-pull-timeout-s", "3"], timeout=240, metrics=True)
        fleet.client = openai.OpenAI(base_url=f"http://127.0.0.1:{fleet.http_port}/v1", api_key="none",
                                     max_retries=0, timeout=120)
        fleet.wait_for_model(MODEL)
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
    pulled = fleet.metric("decode", 'meshserve_kv_transfers_total{outcome="pulled",role="decode"')
    offered = fleet.metric("prefill", 'meshserve_kv_transfers_total{outcome="offered",role="prefill"')
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


def test_one_batch_is_the_same_aggregated_disaggregated_and_split_over_two_sub_meshes(fleet, tiny_ckpt):
    """The same prompts — within one page, at a page edge, longer than a prefill chunk (chunked on
    the prefill side), and one whose first pages the decode side already holds — give the same
    greedy tokens served by one engine as a batch, by the prefill and decode workers across
    processes (through Dynamo), and by two engines on halves of 8 simulated devices (prefill on
    tensor 4, decode on data 2 × tensor 2; pages moved by jax.device_put). All are the dense
    no-cache reference's."""
    import dataclasses

    from meshserve.sharding.mesh import MeshConfig
    from tests.runtime.conftest import greedy_reference

    rng = np.random.default_rng(21)
    warm = rng.integers(1, 250, 40).tolist()
    batch = {"short": rng.integers(1, 250, 5).tolist(), "page edge": rng.integers(1, 250, 33).tolist(),
             "chunked": rng.integers(1, 250, 300).tolist(), "cached prefix": warm[:32] + rng.integers(1, 250, 50).tolist()}
    assert len(batch["chunked"]) > fleet.config.max_prefill_chunk
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    aggregated = Engine(tiny_ckpt, fleet.config).generate(list(batch.values()), params)
    served = {name: list(out.token_ids) for name, out in zip(batch, aggregated)}
    assert served == {name: greedy_reference(tiny_ckpt, ids, 8) for name, ids in batch.items()}

    halves = []
    for role in ("prefill", "decode"):
        lay = MeshConfig.from_yaml(str(ROOT / "configs" / "meshes" / f"cpu-8-{role}.yaml")).build()
        placed = dataclasses.replace(tiny_ckpt, params=lay.place(tiny_ckpt.params, tiny_ckpt.config))
        halves.append(Engine(placed, dataclasses.replace(fleet.config, kv_transfer=True), layout=lay))
    prefill, decode = halves
    decode.generate([warm], SamplingParams(max_tokens=1))
    split = {}
    for name, ids in batch.items():
        prefill.generate([ids], SamplingParams(max_tokens=1))
        held = decode.held_prefix(ids)
        assert (held == 2) == (name == "cached prefix")
        decode.import_prompt(ids, prefill.export_prompt(ids, held))
        split[name] = list(decode.generate([ids], params)[0].token_ids)
    assert split == served

    fleet.client.completions.create(model=MODEL, prompt=warm, max_tokens=1, temperature=0)
    for name, ids in batch.items():
        out = fleet.client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0,
                                              extra_body={"ignore_eos": True})
        assert out.choices[0].text == tiny_ckpt.tokenizer.decode(served[name]), name
    assert out.usage.prompt_tokens_details.cached_tokens >= 32  # the decode worker held the warm prefix


def test_conditional_disaggregation_prefills_mostly_cached_prompts_on_the_decode_worker(fleet, tiny_ckpt):
    """A second Dynamo frontend over the same workers, with Dynamo's conditional disaggregation
    (policy isl_bounding: a request stays on the decode worker when its uncached part is under
    64 tokens and under 70% of the prompt): a new 200-token prompt goes through the prefill
    worker; the same prompt again, and the prompt with 20 more tokens, are mostly cached on the
    decode worker and prefilled there — the prefill worker gets no request. Each answer is one
    engine's."""
    import json

    port = free_port()
    fleet.start_frontend("frontend-conditional", port, [
        "--router-mode", "kv", "--router-conditional-disagg",
        "--router-conditional-disagg-config", json.dumps({"policy": "isl_bounding", "eff_isl_threshold": 64})])
    fleet.wait_for_model(MODEL, port)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    engine = Engine(tiny_ckpt, fleet.config)
    rng = np.random.default_rng(9)
    prompt = rng.integers(1, 250, 200).tolist()
    for ids, remote in ((prompt, True), (prompt, False), (prompt + rng.integers(1, 250, 20).tolist(), False)):
        before = fleet.metric("prefill", "meshserve_requests_total")
        out = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})
        want = engine.generate([ids], SamplingParams(max_tokens=6, ignore_eos=True))[0]
        assert out.choices[0].text == want.text
        assert (fleet.metric("prefill", "meshserve_requests_total") - before == 1) == remote, (len(ids), remote)
        time.sleep(1.0)  # the decode worker's KV events reach the router
    assert out.usage.prompt_tokens_details.cached_tokens == 192  # the first prompt's 12 full pages


def test_pages_go_through_a_shared_store_where_the_transfer_server_cannot_start(fleet, tiny_ckpt):
    """The fallback transport, for real: a second prefill/decode pair (another model name) whose
    transfer servers cannot start (an address this host does not have) hands pages over through
    a kvstore folder both open. Answers are one engine's; the decode worker took every prompt's
    pages from the store and found them in its prefix cache."""
    store = fleet.folder / "kv-handoff"
    common = ["--model", str(fleet.model_dir), "--config", str(fleet.folder / "serving.yaml"), "--model-name",
              "tiny-store", "--transfer-host", "203.0.113.1", "--kv-transfer-store", str(store)]
    try:
        for role, component in (("prefill", "prefill-store"), ("decode", "backend-store")):
            fleet.start_worker(f"{role}-store", [*common, "--role", role, "--component", component],
                               timeout=240, metrics=True)
        fleet.wait_for_model("tiny-store")
        engine = Engine(tiny_ckpt, fleet.config)
        rng = np.random.default_rng(13)
        for n in (40, 150):
            ids = rng.integers(1, 250, n).tolist()
            out = fleet.client.completions.create(model="tiny-store", prompt=ids, max_tokens=6, temperature=0,
                                                  extra_body={"ignore_eos": True})
            assert out.choices[0].text == engine.generate([ids], SamplingParams(max_tokens=6, ignore_eos=True))[0].text
        pages = (40 - 1) // 16 + (150 - 1) // 16
        assert fleet.metric("decode-store", 'meshserve_kv_transfers_total{outcome="pulled",role="decode",'
                                            'transport="store"}') == 2
        assert fleet.metric("decode-store", "meshserve_kv_transfer_pages_total") == pages
        assert fleet.metric("decode-store", 'meshserve_prefix_cache_hit_tokens_total{tier="device"}') == pages * 16
        assert len(list((store / "kv").iterdir())) == pages
        assert "go through the store" in fleet.logs["prefill-store"].read_text()
    finally:
        for name in ("prefill-store", "decode-store"):
            proc = fleet.workers.pop(name, None)
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)


def test_a_decode_worker_killed_mid_stream_loses_no_request(fleet, tiny_ckpt):
    """A second decode worker joins; a stream is SIGKILLed with its decode worker after 5 of 300
    tokens: Dynamo migrates it to the other decode worker and the client gets all 300 tokens, one
    engine's. The prefill worker is left with no page in use. (The stream is long so that the
    tiny model is still decoding when the metrics have named its worker.)"""
    import signal

    fleet.start_worker("decode-2", ["--model", str(fleet.model_dir), "--config", str(fleet.folder / "serving.yaml"),
                                    "--model-name", MODEL, "--role", "decode", "--kv-pull-timeout-s", "3"],
                       timeout=240, metrics=True)
    time.sleep(2.0)  # the frontend sees the new instance
    ids = np.random.default_rng(17).integers(1, 250, 70).tolist()
    want = Engine(tiny_ckpt, fleet.config).generate([ids], SamplingParams(max_tokens=300, ignore_eos=True))[0]
    stream = fleet.client.completions.create(model=MODEL, prompt=ids, max_tokens=300, temperature=0, stream=True,
                                             extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
    text, chunks, usage, killed = "", 0, None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
            chunks += 1
        usage = chunk.usage or usage
        if chunks == 5 and killed is None:
            serving = [w for w in ("decode", "decode-2") if fleet.metric(w, "meshserve_requests_running") == 1]
            assert len(serving) == 1, f"no one decode worker runs the stream: {serving}"
            killed = serving[0]
            fleet.workers[killed].send_signal(signal.SIGKILL)
            fleet.workers[killed].wait(timeout=30)
    assert text == want.text and usage.completion_tokens == 300
    assert "migration retry scheduled" in (fleet.folder / "frontend.log").read_text()  # it did move
    survivor = "decode-2" if killed == "decode" else "decode"
    assert fleet.metric(survivor, "meshserve_requests_total") >= 1
    assert fleet.metric("prefill", "meshserve_kv_pages_used") == 0
    if killed == "decode":  # the survivor serves as "decode" for what follows
        for table in (fleet.workers, fleet.metrics_ports, fleet.logs):
            table["decode"] = table.pop("decode-2")
    deadline = time.monotonic() + 60  # the killed worker's lease runs out: discovery drops it
    while direct(fleet, "dynamo.backend.generate", None) != 1:
        assert time.monotonic() < deadline, "the killed decode worker stayed in discovery"
        time.sleep(1.0)


def direct(fleet, endpoint: str, request: dict | None) -> list[dict] | int:
    """A worker asked directly through Dynamo's own client (no frontend): its chunks; with no
    request, how many instances of the endpoint discovery lists."""
    import asyncio
    import os

    async def ask():
        from dynamo.runtime import DistributedRuntime

        runtime = DistributedRuntime(asyncio.get_running_loop(), "file", "tcp", event_plane="zmq")
        try:
            client = await runtime.endpoint(endpoint).client()
            await asyncio.wait_for(client.wait_for_instances(), 30)
            if request is None:
                return len(client.instance_ids())
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
    failed = 'meshserve_kv_transfers_total{outcome="failed",role="decode"'
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
    failed = 'meshserve_kv_transfers_total{outcome="failed",role="decode"'
    before = fleet.metric("decode", failed)
    started = time.monotonic()
    tokens = [t for c in direct(fleet, "dynamo.backend.generate", decode_request(ids, 6, offer)) for t in c["token_ids"]]
    assert tokens == list(want.token_ids)
    assert 3 <= time.monotonic() - started < 60
    assert fleet.metric("decode", failed) == before + 1
    decode = fleet.workers["decode"]
    decode.send_signal(signal.SIGTERM)
    assert decode.wait(timeout=60) == 0
    assert "still blocked at exit" in fleet.logs["decode"].read_text()
