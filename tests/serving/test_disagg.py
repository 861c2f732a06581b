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
        for role in ("prefill", "decode"):
            fleet.start_worker(role, ["--model", str(tiny_ckpt_dir), "--config", str(tmp / "serving.yaml"),
                                      "--model-name", MODEL, "--role", role], timeout=240, metrics=True)
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
