"""A prompt's KV pages computed by one engine and decoded from by another: in one process, and
across processes through jax.experimental.transfer, against the dense no-cache reference."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from meshserve.models.errors import ConfigError
from meshserve.runtime.engine import Engine
from meshserve.runtime.kv_transfer import Offer, TransferEndpoint, TransferError
from meshserve.runtime.sampling import SamplingParams
from tests.runtime.conftest import greedy_reference
from tests.runtime.kv_transfer_peer import CONFIG

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def prompts():
    rng = np.random.default_rng(7)
    shared = rng.integers(0, 260, 12).tolist()
    return {"short": [5, 6, 7],  # within one page: nothing to move
            "long": rng.integers(0, 260, 45).tolist(),  # three prefill chunks on the prefill side
            "page edge": rng.integers(0, 260, 17).tolist(),  # 4 full pages; the last holds the last token
            "cached prefix": shared + rng.integers(0, 260, 20).tolist(),
            "_warm": shared + [1, 2]}  # run on the decode side first: it holds the shared pages


def test_pages_moved_in_one_process_give_the_tokens_of_one_engine(tiny_ckpt):
    prefill, decode = Engine(tiny_ckpt, CONFIG), Engine(tiny_ckpt, CONFIG)
    cases = prompts()
    decode.generate([cases.pop("_warm")], SamplingParams(max_tokens=1))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    for name, ids in cases.items():
        reusable = (len(ids) - 1) // CONFIG.page_size
        prefill.generate([ids], SamplingParams(max_tokens=1))
        skip = decode.held_prefix(ids)
        assert (skip == 3) == (name == "cached prefix"), name
        pages = prefill.export_prompt(ids, skip).to(jax.devices()[0])
        assert len(pages.hashes) == reusable - skip
        assert decode.import_prompt(ids, pages) == reusable - skip
        out = decode.generate([ids], params, on_output=lambda o, seen=[]: seen.append(o))[0]
        assert list(out.token_ids) == greedy_reference(tiny_ckpt, ids, 8), name
    assert decode.kv.num_free == decode.kv.num_usable


def test_the_decode_side_computes_only_the_tail(tiny_ckpt):
    prefill, decode = Engine(tiny_ckpt, CONFIG), Engine(tiny_ckpt, CONFIG)
    ids = prompts()["long"]
    prefill.generate([ids], SamplingParams(max_tokens=1))
    decode.import_prompt(ids, prefill.export_prompt(ids))
    computed = []
    schedule = decode.scheduler.schedule

    def spy(now):
        plan = schedule(now)
        computed.append(sum(c.end - c.start for c in plan.prefills) + len(plan.decodes))
        return plan

    decode.scheduler.schedule = spy
    outs = []
    decode.generate([ids], SamplingParams(max_tokens=2, ignore_eos=True), on_output=outs.append)
    assert computed[0] == len(ids) - 44 == 1  # 11 pages of 4 moved; the last token computed here
    assert outs[-1].cached_tokens == 44


def test_pages_of_another_model_or_prompt_are_refused(tiny_ckpt):
    prefill, decode = Engine(tiny_ckpt, CONFIG), Engine(tiny_ckpt, CONFIG)
    ids = prompts()["long"]
    prefill.generate([ids], SamplingParams(max_tokens=1))
    pages = prefill.export_prompt(ids)
    with pytest.raises(TransferError, match="not this prompt's"):
        decode.import_prompt(ids[:-5] + [1, 2, 3, 4, 5], pages)
    with pytest.raises(TransferError, match="another model"):
        decode.import_prompt(ids, dataclasses.replace(pages, fingerprint="0" * 16))
    with pytest.raises(TransferError, match="start at page 2"):
        decode.import_prompt(ids, prefill.export_prompt(ids, skip=2))
    assert decode.kv.num_free == decode.kv.num_usable  # nothing was taken
    with pytest.raises(ConfigError, match="kv_transfer"):
        Engine(tiny_ckpt, dataclasses.replace(CONFIG, kv_transfer=False)).export_prompt(ids)


@pytest.fixture
def peer(tiny_ckpt_dir):
    proc = subprocess.Popen([sys.executable, "-m", "tests.runtime.kv_transfer_peer", str(tiny_ckpt_dir)],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "XLA_FLAGS": ""})
    try:
        assert "ready" in json.loads(proc.stdout.readline())
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _ask(proc, ids, skip=0) -> Offer:
    proc.stdin.write(json.dumps({"ids": ids, "skip": skip}) + "\n")
    proc.stdin.flush()
    return Offer.from_dict(json.loads(proc.stdout.readline()))


def test_pages_pulled_from_another_process(tiny_ckpt, peer):
    """jax.experimental.transfer between two processes: the pulled pages give the reference's
    tokens; a pull of an id that was never offered, and one from a peer that was killed, are
    errors within their deadline, never a hang."""
    decode, endpoint = Engine(tiny_ckpt, CONFIG), TransferEndpoint()
    cases = prompts()
    decode.generate([cases.pop("_warm")], SamplingParams(max_tokens=1))
    for name in ("long", "cached prefix"):
        ids = cases[name]
        offer = _ask(peer, ids, decode.held_prefix(ids))
        pages = endpoint.pull(offer, timeout_s=60)
        assert decode.import_prompt(ids, pages) == len(pages.hashes) > 0
        out = decode.generate([ids], SamplingParams(max_tokens=8, ignore_eos=True))[0]
        assert list(out.token_ids) == greedy_reference(tiny_ckpt, ids, 8), name
    # an id the peer never offered
    ids = cases["page edge"]
    offer = _ask(peer, ids)
    t = time.monotonic()
    with pytest.raises(TransferError, match="did not finish within 2"):
        endpoint.pull(dataclasses.replace(offer, uuids=(offer.uuids[0] + 99,)), timeout_s=2)
    assert time.monotonic() - t < 10
    # the peer killed before the pull
    peer.kill()
    peer.wait(timeout=30)
    t = time.monotonic()
    with pytest.raises(TransferError):
        endpoint.pull(offer, timeout_s=2)
    assert time.monotonic() - t < 10
    assert decode.failed is None and decode.kv.num_free == decode.kv.num_usable


def test_pages_move_between_two_meshes_of_one_process_with_other_splits(tiny_ckpt):
    """Prefill on devices 0-3 (tensor 4), decode on 4-7 (data 2 × tensor 2), from the two mesh files
    in configs/meshes: the pages are relaid into the decode side's split on the way in, and the
    tokens are the dense reference's."""
    from meshserve.sharding.mesh import MeshConfig
    from tests.sharding.test_sharded_engine import SMALL, WIDE, random_ckpt

    ckpt = random_ckpt(tiny_ckpt, WIDE)
    engines = []
    for role in ("prefill", "decode"):
        lay = MeshConfig.from_yaml(os.path.join(ROOT, "configs", "meshes", f"cpu-8-{role}.yaml")).build()
        placed = dataclasses.replace(ckpt, params=lay.place(ckpt.params, ckpt.config))
        engines.append(Engine(placed, dataclasses.replace(SMALL, kv_transfer=True), layout=lay))
    prefill, decode = engines
    assert {d.id for d in prefill.layout.mesh.devices.flat} == {0, 1, 2, 3}
    assert {d.id for d in decode.layout.mesh.devices.flat} == {4, 5, 6, 7}
    rng = np.random.default_rng(11)
    for n in (40, 19, 33):
        ids = rng.integers(0, 256, n).tolist()
        prefill.generate([ids], SamplingParams(max_tokens=1))
        pages = prefill.export_prompt(ids, decode.held_prefix(ids))
        assert decode.import_prompt(ids, pages) == (n - 1) // SMALL.page_size
        outs = []
        decode.generate([ids], SamplingParams(max_tokens=6, ignore_eos=True), on_output=outs.append)
        assert [t for o in outs for t in o.token_ids] == greedy_reference(ckpt, ids, 6)
        assert outs[-1].cached_tokens == (n - 1) // SMALL.page_size * SMALL.page_size
    assert decode.kv.num_free == decode.kv.num_usable


def test_pages_handed_over_through_a_shared_store(tiny_ckpt, tmp_path):
    """The fallback transport: the prefill side writes a prompt's pages to a kvstore folder under
    their names, the decode side (another StoreEndpoint on the same folder) reads those it lacks;
    tokens are the dense reference's. A page missing from the store ends the read there."""
    from meshserve.runtime.kv_transfer import StoreEndpoint

    prefill, decode = Engine(tiny_ckpt, CONFIG), Engine(tiny_ckpt, CONFIG)
    shape = prefill.pool.page_shape
    writer = StoreEndpoint(str(tmp_path / "kv"), shape, np.float32)
    reader = StoreEndpoint(str(tmp_path / "kv"), shape, np.float32)  # opened before anything was written
    cases = prompts()
    decode.generate([cases.pop("_warm")], SamplingParams(max_tokens=1))
    for name in ("long", "cached prefix", "page edge"):
        ids = cases[name]
        prefill.generate([ids], SamplingParams(max_tokens=1))
        offer = json.loads(json.dumps(writer.offer(prefill.export_prompt(ids))))  # as it crosses the wire
        assert offer["transport"] == "store" and len(offer["pages"]["hashes"]) == (len(ids) - 1) // 4
        held = decode.held_prefix(ids)
        pages = reader.pull(offer, held)
        assert pages.first == held and len(pages.hashes) == (len(ids) - 1) // 4 - held
        assert decode.import_prompt(ids, pages) == len(pages.hashes)
        out = decode.generate([ids], SamplingParams(max_tokens=8, ignore_eos=True))[0]
        assert list(out.token_ids) == greedy_reference(tiny_ckpt, ids, 8), name
    assert len(list((tmp_path / "kv" / "kv").iterdir())) == 11 + 7 + 4  # a value per page, named by its hash
    # a page missing from the store: the pages before it are read, the rest is left to compute
    ids = cases["long"]
    offer = writer.offer(prefill.export_prompt(ids))
    (tmp_path / "kv" / "kv" / offer["pages"]["hashes"][5]).unlink()
    fresh = StoreEndpoint(str(tmp_path / "kv"), shape, np.float32)
    assert len(fresh.pull(offer).hashes) == 5
    with pytest.raises(TransferError, match="not in the KV store"):
        fresh.pull(offer, skip=5)


def test_a_producer_killed_mid_pull_is_an_error_within_the_deadline():
    """jax.experimental.transfer's pull never returns when the producer dies during it: our
    deadline turns that into a TransferError. A producer offers 384 MiB (seconds to pull here) and
    is SIGKILLed 0.2 s into the pull."""
    import threading

    code = ("import json, sys, time, jax, jax.numpy as jnp\n"
            "from meshserve.runtime.kv_transfer import KVPages, TransferEndpoint\n"
            "e = TransferEndpoint()\n"
            "a = jnp.ones((48, 2 * 1024 * 1024), jnp.float32).block_until_ready()\n"
            "print(json.dumps(e.offer(KVPages((b'x' * 16,), 0, (a,), 'f')).as_dict()), flush=True)\n"
            "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "XLA_FLAGS": ""})
    try:
        offer = Offer.from_dict(json.loads(proc.stdout.readline()))
        endpoint, result = TransferEndpoint(), {}

        def pull():
            try:
                result["pages"] = endpoint.pull(offer, timeout_s=15)
            except TransferError as e:
                result["error"] = e

        puller = threading.Thread(target=pull)
        started = time.monotonic()
        puller.start()
        time.sleep(0.2)
        proc.kill()
        puller.join(60)
        assert not puller.is_alive()
        assert "pages" not in result, "the pull finished before the kill: offer a larger array"
        assert isinstance(result["error"], TransferError)
        assert time.monotonic() - started < 30
    finally:
        proc.kill()
        proc.wait(timeout=30)
