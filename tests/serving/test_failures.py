"""The failure contract, against real servers on loopback: an engine fault ends every stream with a
status, flips health and exits the process non-zero; a dead or stuck engine thread is noticed; a
graceful stop persists every cached page; nothing runnable costs no CPU; long prompts are tokenized
off the event loop."""

import concurrent.futures
import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from meshserve.runtime.engine import Engine, EngineConfig
from meshserve.serving.client import Client
from meshserve.serving.config import ServerConfig
from meshserve.serving.proto.meshserve.v1 import generation_pb2 as pb
from meshserve.serving.server import EXIT_ENGINE_FAILED, ServerThread
from tests.serving.test_serve_cli import free_port

ROOT = Path(__file__).resolve().parents[2]
ENGINE = dict(page_size=8, kv_cache_bytes=2**20, max_seq_len=64, max_num_seqs=16, max_num_batched_tokens=256,
              max_prefill_chunk=64, prefill_buckets=[64], decode_buckets=[16], context_buckets=[8],
              compilation_cache_dir=None)
SERVER = ServerConfig(port=0, metrics_port=None)


def write_config(tmp_path, ckpt_dir, port, engine=None, server=None) -> Path:
    path = tmp_path / "serving.yaml"
    path.write_text(yaml.safe_dump({"engine": {**ENGINE, **(engine or {})},
                                    "server": {"port": port, "metrics_port": None, "model": str(ckpt_dir),
                                               **(server or {})}}))
    return path


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def health(port: int) -> str:
    """SERVING, NOT_SERVING, or GONE (not listening any more)."""
    try:
        with Client(f"127.0.0.1:{port}") as c:
            return c.health(timeout=0.5)
    except grpc.RpcError:
        return "GONE"


def stream_status(port: int, **kwargs) -> tuple[grpc.StatusCode, int]:
    """Status of one Generate call (no deadline: a call that never ends is caught by the caller)."""
    n = 0
    try:
        with Client(f"127.0.0.1:{port}") as c:
            for resp in c.generate(**kwargs):
                n += len(resp.token_ids)
    except grpc.RpcError as e:
        return e.code(), n
    return grpc.StatusCode.OK, n


# ---- in their own process ---------------------------------------------------------------------------


def test_a_fault_after_dispatch_ends_every_stream_and_exits_non_zero(tiny_ckpt_dir, tmp_path):
    port = free_port()
    config = write_config(tmp_path, tiny_ckpt_dir, port)
    server = start(["tests.serving.faulty_server", str(config), "4"])
    try:
        with Client(f"127.0.0.1:{port}") as c:
            c.wait_serving(timeout=300)
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            calls = [ex.submit(stream_status, port, token_ids=[i + 1, 7, 9], max_tokens=50, ignore_eos=True)
                     for i in range(4)]
            first = next(concurrent.futures.as_completed(calls, timeout=60))  # never a hang
            t0 = time.monotonic()
            while health(port) == "SERVING":
                assert time.monotonic() - t0 < 1.0, "health still SERVING a second after the fault"
                time.sleep(0.02)
            statuses = [call.result(timeout=30) for call in calls]
        assert first.result()[0] == grpc.StatusCode.UNAVAILABLE
        assert [code for code, _ in statuses] == [grpc.StatusCode.UNAVAILABLE] * 4
        server.wait(timeout=60)
        assert server.returncode == EXIT_ENGINE_FAILED
        err = server.stderr.read()
        assert "injected device fault" in err and "meshserve: error: the engine failed" in err
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_sigterm_during_16_streams_persists_every_cached_page(tiny_ckpt_dir, tmp_path):
    port = free_port()
    store = tmp_path / "kv"
    config = write_config(tmp_path, tiny_ckpt_dir, port, engine=dict(host_kv_bytes=0, kv_store=str(store)))
    server = start(["meshserve.serving.cli", "serve", "--config", str(config), "--quiet"])
    rng = np.random.default_rng(0)
    prompts = [[i + 1] + rng.integers(0, 260, 19 + i).tolist() for i in range(16)]  # distinct first pages
    new = 12
    started = threading.Barrier(17, timeout=120)

    def one(prompt):
        with Client(f"127.0.0.1:{port}") as c:
            resps = c.generate(token_ids=prompt, max_tokens=new, ignore_eos=True)
            out = [next(resps)]
            started.wait()
            return out + list(resps)

    try:
        with Client(f"127.0.0.1:{port}") as c:
            c.wait_serving(timeout=300)
        with concurrent.futures.ThreadPoolExecutor(16) as ex:
            calls = [ex.submit(one, p) for p in prompts]
            started.wait()  # every stream is under way
            server.send_signal(signal.SIGTERM)
            results = [call.result(timeout=60) for call in calls]
        assert server.wait(timeout=120) == 0, server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert all(r[-1].finish_reason == pb.FINISH_REASON_LENGTH for r in results)  # drained, not cut
    # every full page a request computed (its tokens but the last sampled one) is in the store
    expected = sum((len(p) + new - 1) // ENGINE["page_size"] for p in prompts)
    assert len(list((store / "kv").iterdir())) == expected


def test_a_bounded_store_keeps_within_its_capacity_and_heals_damaged_pages(tiny_ckpt, tiny_ckpt_dir, tmp_path):
    """A real server on a store of 24 pages: 10 prompts of 4 full pages each, one after another,
    leave the store within its capacity (± a page) holding the latest prompt's pages. Two of those
    damaged, a restarted server computes that prompt again (the first bad page fails its checksum,
    logged once) and its SIGTERM persist rewrites both, verified, not only the one it read."""
    from meshserve.runtime.block_manager import chain_hash
    from meshserve.runtime.kv_cache import page_bytes
    from meshserve.runtime.kv_tiers import StoreTier

    store = tmp_path / "kv"
    value = StoreTier.header_bytes(4) + page_bytes(tiny_ckpt.config, ENGINE["page_size"], tiny_ckpt.dtype)
    rng = np.random.default_rng(3)
    prompts = [[i + 1] + rng.integers(0, 260, 33).tolist() for i in range(10)]  # 34 + 4 tokens: 4 full pages

    def serve(prompts: list[list[int]]) -> tuple[bytes, str]:
        port = free_port()
        config = write_config(tmp_path, tiny_ckpt_dir, port,
                              engine=dict(host_kv_bytes=0, kv_store=str(store), kv_store_bytes=24 * value))
        server = start(["meshserve.serving.cli", "serve", "--config", str(config), "--quiet"])
        try:
            with Client(f"127.0.0.1:{port}") as c:
                c.wait_serving(timeout=300)
                salt = bytes.fromhex(c.model_info().kv_fingerprint)
                for prompt in prompts:
                    assert list(c.generate(token_ids=prompt, max_tokens=4, ignore_eos=True))[-1].finish_reason
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=120) == 0
            return salt, server.stderr.read()
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()

    salt, _ = serve(prompts)
    files = {f.name: f for f in (store / "kv").iterdir()}
    assert sum(f.stat().st_size for f in files.values()) <= 25 * value and len(files) >= 23
    names, parent = [], salt
    for i in range(4):
        parent = chain_hash(parent, prompts[-1][8 * i:8 * i + 8])
        names.append(parent.hex())
    assert set(names) <= set(files)  # the latest prompt's pages are kept
    for name in names[1:3]:
        data = bytearray(files[name].read_bytes())
        data[-3] ^= 0xFF
        files[name].write_bytes(bytes(data))
    _, err = serve([prompts[-1]])
    assert err.count("could not be read") == 1, err
    for name in names:  # both damaged pages were written again, whole
        assert StoreTier.decode((store / "kv" / name).read_bytes()).shape[1] == ENGINE["page_size"]
    assert sum(f.stat().st_size for f in (store / "kv").iterdir()) <= 25 * value


def test_a_pool_too_small_for_max_seq_len_fails_before_listening(tiny_ckpt_dir, tmp_path):
    port = free_port()
    # 16 pages of 8 tokens: 120 usable tokens, but max_seq_len 256
    config = write_config(tmp_path, tiny_ckpt_dir, port, engine=dict(kv_cache_bytes=16 * 2048, max_seq_len=256,
                                                                     context_buckets=[32]))
    result = subprocess.run([sys.executable, "-m", "meshserve.serving.cli", "serve", "--config", str(config)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "meshserve: error: the KV cache holds 120 tokens per data replica (16 pages of 8 tokens), fewer than "
        "max_seq_len (256): one request could never fit; set kv_cache_bytes to at least 67584 or lower max_seq_len"]


# ---- in this process ----------------------------------------------------------------------------------


def _server(tiny_ckpt, **server):
    return ServerThread(dataclasses.replace(SERVER, **server),
                        lambda: Engine(tiny_ckpt, EngineConfig.from_dict(ENGINE)))


def _kill(thread: threading.Thread) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit))


@pytest.mark.parametrize("how", ["killed", "stuck"])
def test_a_dead_or_stuck_engine_thread_flips_health_and_ends_streams(tiny_ckpt, how):
    s = _server(tiny_ckpt, step_timeout_s=0.5)
    with s:
        s.wait_ready()
        engine, loop = s.server.loop.engine, s.server.loop
        if how == "stuck":
            real = engine.step
            steps = [0]

            def step():
                steps[0] += 1
                if steps[0] == 5:
                    time.sleep(3)  # a device that stopped answering
                return real()

            engine.step = step
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            calls = [ex.submit(stream_status, s.port, token_ids=[i + 1, 5], max_tokens=60, ignore_eos=True)
                     for i in range(8)]
            while engine.scheduler.num_unfinished < 8:
                time.sleep(0.005)
            t0 = time.monotonic()
            if how == "killed":
                _kill(loop.thread)
            while health(s.port) == "SERVING":
                assert time.monotonic() - t0 < 1.0 + (0.5 if how == "stuck" else 0), "still SERVING"
                time.sleep(0.02)
            statuses = [call.result(timeout=30)[0] for call in calls]
        assert set(statuses) == {grpc.StatusCode.UNAVAILABLE}
        s.wait_closed()
        assert s.server.exit_code == EXIT_ENGINE_FAILED
        assert ("thread died" if how == "killed" else "step_timeout_s") in loop.failure


def _cpu_seconds(thread: threading.Thread) -> float:
    fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_an_engine_with_nothing_runnable_sleeps(tiny_ckpt):
    with _server(tiny_ckpt) as s:
        s.wait_ready()
        engine, thread = s.server.loop.engine, s.server.loop.thread
        hog = engine.kv.blocks.grow([], engine.kv.num_free * engine.config.page_size)  # every page taken
        assert hog is not None
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            waiting = ex.submit(stream_status, s.port, token_ids=[3, 4, 5], max_tokens=4, ignore_eos=True)
            while not engine.scheduler.waiting:
                time.sleep(0.01)
            time.sleep(0.2)
            cpu0, t0 = _cpu_seconds(thread), time.monotonic()
            time.sleep(2.0)
            share = (_cpu_seconds(thread) - cpu0) / (time.monotonic() - t0)
            assert share < 0.05, f"the engine thread used {share:.0%} of a core with nothing to run"
            engine.kv.blocks.release(hog)  # pages again: the next command wakes the engine
            other = ex.submit(stream_status, s.port, token_ids=[6, 7], max_tokens=4, ignore_eos=True)
            assert waiting.result(timeout=30) == (grpc.StatusCode.OK, 4)
            assert other.result(timeout=30) == (grpc.StatusCode.OK, 4)


def test_a_long_prompt_is_tokenized_off_the_event_loop(tiny_ckpt):
    """While a 4 MB prompt is tokenized (seconds), other streams keep flowing. (A text that long
    cannot fit the context and is refused untokenized, tests/serving/test_hostile.py: the size
    check is lifted here to make the tokenizer work.)"""
    with _server(tiny_ckpt, max_message_bytes=8 * 2**20) as s:
        s.wait_ready()
        s.server.preprocessor.max_text_chars = 10**9
        done = threading.Event()
        arrivals = []

        def steady():
            with Client(f"127.0.0.1:{s.port}") as c:
                while not done.is_set():
                    for _ in c.generate(token_ids=[3, 4], max_tokens=40, ignore_eos=True):
                        arrivals.append(time.monotonic())

        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            flowing = ex.submit(steady)
            while len(arrivals) < 20:
                time.sleep(0.01)
            t0 = time.monotonic()
            code, _ = stream_status(s.port, text="the theory in an inn " * 200_000, max_tokens=1)
            took = time.monotonic() - t0
            done.set()
            flowing.result(timeout=60)
        assert code == grpc.StatusCode.INVALID_ARGUMENT  # far longer than the context, once tokenized
        assert took > 1.5, "the prompt must take a while to tokenize for this test to mean anything"
        during = [b - a for a, b in zip(arrivals, arrivals[1:]) if t0 <= a <= t0 + took]
        assert during and max(during) < 0.5, f"streams stalled {max(during):.2f} s while a prompt was tokenized"


def test_time_to_first_token_and_queue_time_count_tokenization(tiny_ckpt, monkeypatch):
    tokenizer = tiny_ckpt.tokenizer
    real = tokenizer.encode

    def slow(text, add_bos=None):
        time.sleep(0.3)
        return real(text, add_bos)

    with _server(tiny_ckpt) as s:
        s.wait_ready()
        monkeypatch.setattr(tokenizer, "encode", slow)
        with Client(f"127.0.0.1:{s.port}") as c:
            last = list(c.generate(text="hello", max_tokens=2, ignore_eos=True))[-1]
        monkeypatch.undo()
    assert last.usage.time_to_first_token_s >= 0.3 and last.usage.queue_time_s >= 0.3


def test_submissions_racing_a_stop_all_get_an_answer(tiny_ckpt):
    import asyncio

    from meshserve.runtime.sampling import SamplingParams
    from meshserve.serving.engine_loop import EngineLoop, EngineUnavailable, Stream
    from meshserve.serving.metrics import Metrics
    from meshserve.runtime.request import Request

    loop = EngineLoop(lambda: Engine(tiny_ckpt, EngineConfig.from_dict(ENGINE)), Metrics())
    loop.start()
    assert loop.ready.wait(120)
    aio = asyncio.new_event_loop()
    runner = threading.Thread(target=aio.run_forever, daemon=True)
    runner.start()
    futures = []

    def submit(i):
        request = Request([3, 4 + i % 5], SamplingParams(max_tokens=30, ignore_eos=True), 0, f"r{i}",
                                time.monotonic())
        futures.append(loop.submit_all([(request, Stream(aio, asyncio.Queue(), time.monotonic()))]))

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        for i in range(40):
            ex.submit(submit, i)
            if i == 20:
                ex.submit(loop.stop, 30)
    for future in futures:  # admitted, or refused: never left waiting
        try:
            future.result(timeout=10)
        except EngineUnavailable:
            pass
    assert not loop.thread.is_alive() and len(futures) == 40
    aio.call_soon_threadsafe(aio.stop)
    runner.join(10)


def test_a_graceful_stop_waits_for_a_request_being_tokenized(tiny_ckpt, monkeypatch):
    real = tiny_ckpt.tokenizer.encode
    tokenizing = threading.Event()

    def slow(text, add_bos=None):
        tokenizing.set()
        time.sleep(0.8)
        return real(text, add_bos)

    with _server(tiny_ckpt) as s:
        s.wait_ready()
        monkeypatch.setattr(tiny_ckpt.tokenizer, "encode", slow)
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            call = ex.submit(lambda: list(Client(f"127.0.0.1:{s.port}").generate(text="hello", max_tokens=5,
                                                                                 ignore_eos=True)))
            assert tokenizing.wait(10)
            s.shutdown(drain_timeout_s=10)
            responses = call.result(timeout=30)
        assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_a_stop_during_a_stuck_step_returns_once_the_watchdog_fires(tiny_ckpt):
    s = _server(tiny_ckpt, step_timeout_s=0.5)
    with s:
        s.wait_ready()
        engine = s.server.loop.engine
        real, stuck = engine.step, threading.Event()

        def step():
            stuck.set()
            time.sleep(5)
            return real()

        engine.step = step
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            call = ex.submit(stream_status, s.port, token_ids=[3, 4], max_tokens=4)
            assert stuck.wait(10)
            t0 = time.monotonic()
            s.shutdown(drain_timeout_s=0)
            assert time.monotonic() - t0 < 3.0
            assert call.result(timeout=10)[0] == grpc.StatusCode.UNAVAILABLE
        assert s.server.exit_code == EXIT_ENGINE_FAILED
