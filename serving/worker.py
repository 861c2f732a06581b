"""meshserve as an NVIDIA Dynamo backend: `meshserve worker`.

Dynamo's own frontend (OpenAI HTTP, tokenization, chat templates, stop strings), its KV-aware
router, discovery and request migration sit in front; this process is one engine behind them,
token-in / token-out:

    dynamo.frontend ──request plane (tcp)──▶ Worker.generate ──▶ EngineLoop ──▶ Engine
          ▲   ▲                                    │                               │
          │   └──── KV events (stored / removed) ◀─┴── KVPublisher ◀── engine.drain_kv_events()
          └──────── discovery (file, etcd or Kubernetes): the model card and this instance

The worker registers the model (its tokenizer, chat template and context length, written as a
Hugging Face style folder: Dynamo's model card reads that) with `kv_cache_block_size` = the
engine's page size, so the router's blocks are meshserve's pages. Every page the device fills is
published with its token ids and meshserve's chained hash (the router hashes the tokens itself;
the chained hash names the page when it is removed); a page stays published while any tier (device,
host, store) holds it.

Discovery and transport come from Dynamo's environment variables (DYN_DISCOVERY_BACKEND,
DYN_REQUEST_PLANE, DYN_EVENT_PLANE, DYN_FILE_KV, DYN_TCP_RPC_HOST, …); see docs/fleet.md.

Lifecycle: the engine is built (load + compile) before the worker registers, so the frontend never
routes to a worker that cannot serve. SIGTERM: leave discovery at once, let in-flight requests
finish (`server.drain_timeout_s`), abort the rest, persist the prefix cache, exit 0. An engine
failure: leave discovery, end every stream, exit EXIT_ENGINE_FAILED.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from meshserve.models.config import HF_CLASSES
from meshserve.models.errors import MeshserveError, RequestError
from meshserve.runtime.engine import Engine, QueueFullError
from meshserve.runtime.kv_tiers import KVEvent
from meshserve.runtime.grammar import Guided
from meshserve.runtime.sampling import SamplingParams
from meshserve.serving.config import ServerConfig
from meshserve.serving.engine_loop import EngineUnavailable
from meshserve.serving.handoff import Handoff, HandoffConfig
from meshserve.serving.host import ProcessHost
from meshserve.serving.info import EngineInfo
from meshserve.serving.openai import API_DEFAULTS

log = logging.getLogger("meshserve.worker")

ROLES = ("both", "prefill", "decode")  # aggregated; or one half of Dynamo's disaggregated serving
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled"}


def model_card(info: EngineInfo, parent: Path) -> Path:
    """The files Dynamo's model card is made of — config.json (Hugging Face keys), tokenizer.json,
    tokenizer_config.json (with the chat template) — in a folder of `parent` named by their
    content. Dynamo's frontend accepts the workers of one model only if their cards agree, path
    included, so every worker of a model on a host shares the one folder (written once, whole)."""
    import hashlib

    staging = Path(tempfile.mkdtemp(prefix=".meshserve-card-", dir=parent))
    try:
        _write_card(info, staging)
        digest = hashlib.sha256()
        for f in sorted(staging.iterdir()):
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
        folder = parent / f"meshserve-model-card-{digest.hexdigest()[:16]}"
        if not folder.exists():
            with contextlib.suppress(OSError):  # another worker got there first: the same files
                staging.rename(folder)
        return folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_card(info: EngineInfo, folder: Path) -> None:
    c, tok = info.model, info.tokenizer
    config = {"architectures": [HF_CLASSES[c.architecture]], "model_type": c.architecture, "vocab_size": c.vocab_size,
              "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
              "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
              "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
              "max_position_embeddings": info.context_length, "bos_token_id": tok.bos_id,
              "eos_token_id": sorted(info.eos_ids)}
    numerics = info.numerics
    config.update(torch_dtype=numerics["dtype"], kv_cache_dtype=numerics["kv_cache_dtype"])
    if c.quantization:  # models/quant.py's format (not one of transformers' quant methods)
        config["quantization_config"] = {"quant_method": "meshserve", "format": c.quantization}
    if c.num_experts:
        config.update(num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                      moe_intermediate_size=c.moe_intermediate_size)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    tok.save(folder)


def sampling_params(request: dict[str, Any], prompt_len: int, max_seq_len: int,
                    defaults: dict[str, Any] | None = None) -> SamplingParams:
    """Dynamo's token-in request (sampling_options, stop_conditions, output_options) as the engine's
    SamplingParams; unset sampling options take the server's defaults (the model's), then OpenAI's.
    Stop strings stay with the frontend, which detokenizes; EOS ids come from the frontend's list
    (empty when the client asked to ignore EOS)."""
    so = {**API_DEFAULTS, **(defaults or {}),
          **{k: v for k, v in (request.get("sampling_options") or {}).items() if v is not None}}
    sc = request.get("stop_conditions") or {}
    oo = request.get("output_options") or {}
    given = lambda d, key, default: default if d.get(key) is None else d[key]
    max_tokens = sc.get("max_tokens") or max(1, max_seq_len - prompt_len)
    eos = request.get("eos_token_ids")
    stop_ids = tuple(sc.get("stop_token_ids_hidden") or ()) + tuple(sc.get("stop_token_ids") or ())
    return SamplingParams(
        max_tokens=int(max_tokens), temperature=float(so["temperature"]),
        top_k=max(0, int(so.get("top_k", 0))), top_p=float(so.get("top_p", 1.0)),
        min_p=float(so.get("min_p", 0.0)), repetition_penalty=float(so.get("repetition_penalty", 1.0)),
        presence_penalty=float(so.get("presence_penalty", 0.0)),
        frequency_penalty=float(so.get("frequency_penalty", 0.0)), seed=so.get("seed"),
        stop_token_ids=stop_ids, ignore_eos=bool(sc.get("ignore_eos")) or eos == [],
        logprobs=oo.get("logprobs"), min_tokens=int(given(sc, "min_tokens", 0)),
        detokenize=False,  # the frontend detokenizes: the engine's text would go nowhere
        guided=guided(so.get("guided_decoding")))


GUIDED_KINDS = ("json", "regex", "choice", "grammar")  # guided_decoding's constraints (the frontend's names)


def guided(options: dict[str, Any] | None) -> Guided | None:
    """Dynamo's guided_decoding (what its frontend makes of response_format and vLLM's guided_*
    fields) as the engine's constraint; RequestError for more than one, or for an option it has no
    way to honour."""
    given = {k: v for k, v in (options or {}).items() if v is not None}
    given.pop("backend", None)  # which library enforces it is the worker's choice
    unknown = sorted(set(given) - set(GUIDED_KINDS))
    if unknown:
        raise RequestError(f"guided_decoding: {', '.join(unknown)} not supported by meshserve")
    if len(given) > 1:
        raise RequestError(f"guided_decoding: give one constraint, got {', '.join(sorted(given))}")
    if not given:
        return None
    (kind, value), = given.items()
    if kind == "json":
        return Guided.json_schema(json.loads(value) if isinstance(value, str) else value)
    if kind == "choice":
        return Guided.choice(value)
    if not isinstance(value, str):
        raise RequestError(f"guided_decoding.{kind} must be a string")
    return Guided(kind, value)


def refuse_unservable(request: dict[str, Any]) -> None:
    """RequestError for what Dynamo's frontend forwards and a meshserve worker cannot honour (as
    `meshserve serve` refuses it), never silently ignored: several choices per request."""
    so = request.get("sampling_options") or {}
    for field in ("n", "best_of"):
        if (so.get(field) or 1) > 1:
            raise RequestError(f"{field}={so[field]}: a meshserve Dynamo worker returns one choice per request; "
                               f"send {so[field]} requests (meshserve serve honours n)")
    if so.get("use_beam_search"):
        raise RequestError("use_beam_search is not supported")


def signed64(page_hash: bytes) -> int:
    """A page's hash as the signed 64-bit id Dynamo's events carry."""
    return int.from_bytes(page_hash[:8], "little", signed=True)


class KVPublisher:
    """Follows the engine's cached-page events and tells Dynamo's router what this worker holds, per
    data replica (dp_rank): a page is published when the first tier stores it and removed when the
    last tier drops it. Lower tiers hold only pages the device had; a page whose tokens were never
    seen (read from a store written by an earlier process) cannot be named to the router and is
    not published."""

    def __init__(self, publishers: list, page_size: int):
        self._publishers = publishers  # one per replica (dp_rank)
        self._page_size = page_size
        self._tiers: dict[bytes, set[str]] = {}
        self._published: dict[bytes, int] = {}  # hash → replica
        self.stored = self.removed = 0

    def publish(self, events: list[KVEvent]) -> None:
        for e in events:
            tiers = self._tiers.setdefault(e.page_hash, set())
            if e.kind == "stored":
                tiers.add(e.tier)
                if e.page_hash not in self._published and e.tokens is not None:
                    parent = None if e.parent is None or e.parent not in self._published else signed64(e.parent)
                    self._publishers[e.replica].publish_stored(
                        token_ids=list(e.tokens), num_block_tokens=[self._page_size],
                        block_hashes=[signed64(e.page_hash)], parent_hash=parent)
                    self._published[e.page_hash] = e.replica
                    self.stored += 1
            else:
                tiers.discard(e.tier)
                if not tiers:
                    del self._tiers[e.page_hash]
                    replica = self._published.pop(e.page_hash, None)
                    if replica is not None:
                        self._publishers[replica].publish_removed(block_hashes=[signed64(e.page_hash)])
                        self.removed += 1


class Worker:
    """One engine registered with Dynamo as `namespace.component.endpoint`, serving `model_name`: a
    transport of its own process host (serving/host.py), which keeps its health, drain and exit code."""

    def __init__(self, config: ServerConfig, build: Callable[[], Engine], *,
                 model_name: str | None = None, namespace: str = "dynamo", component: str = "backend",
                 endpoint: str = "generate", metrics_port: int | None = None, mirror=None,
                 role: str = "both", handoff: HandoffConfig = HandoffConfig()):
        if role not in ROLES:
            raise MeshserveError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if role != "both" and mirror is not None:
            raise MeshserveError("a prefill or decode worker runs in one process (no multi-host mesh yet)")
        self.role = role
        self.handoff_config = handoff
        self.handoff: Handoff | None = None  # of a prefill or decode worker, opened once the engine is built
        self.model_name = model_name
        self.address = f"{namespace}.{component}.{endpoint}"
        # meshserve's own Prometheus metrics on `metrics_port` (None: off; Dynamo's are on DYN_SYSTEM_PORT)
        self.host = ProcessHost(dataclasses.replace(config, port=None, http_port=None, metrics_port=metrics_port),
                                build, mirror=mirror)
        self.host.register(self)
        self.host.step_observers.append(self._on_step)
        self.loop, self.metrics = self.host.loop, self.host.metrics
        self.kv: KVPublisher | None = None
        self._aio: asyncio.AbstractEventLoop | None = None
        self._runtime = None
        self._endpoint = None
        self._serving: asyncio.Future | None = None
        self._load = None
        self._used = -1  # pages in use last published (engine thread)

    # ---- engine thread ---------------------------------------------------------------------------

    def _on_step(self, engine: Engine) -> None:
        """After every step: hand the event loop what changed (cached pages, pages in use), if anything."""
        events, used = engine.drain_kv_events(), engine.stats()["pages_used"]
        if events or used != self._used:
            self._used = used
            self._aio.call_soon_threadsafe(self._after_step, events, used)

    # ---- event loop -------------------------------------------------------------------------------

    def _after_step(self, events: list[KVEvent], used: int) -> None:
        try:
            if self.kv is not None and events:
                self.kv.publish(events)
            if self._load is not None:
                self._load.publish(None, active_decode_blocks=used, kv_used_blocks=used)
        except Exception as e:  # the router falls back to load-only routing: say so loudly
            log.error("KV events or load metrics could not be published: %s: %s", type(e).__name__, e)
            self.metrics.kv_event_failures.inc()

    async def start(self, host: ProcessHost) -> None:
        self._aio = asyncio.get_running_loop()

    async def ready(self, host: ProcessHost) -> None:
        """The engine is built: open the KV transports (a worker that cannot move pages never joins),
        join Dynamo's discovery with the model's card, and serve the endpoint."""
        from dynamo.llm import (KvEventPublisher, ModelInput, ModelRuntimeConfig, ModelType, WorkerMetricsPublisher,
                                WorkerType, register_model)
        from dynamo.runtime import DistributedRuntime

        info = host.info
        self.model_name = self.model_name or info.served_name
        if self.role != "both":
            self.handoff = Handoff(self.handoff_config, info, self.metrics)
        try:
            self._runtime = DistributedRuntime(self._aio, os.environ.get("DYN_DISCOVERY_BACKEND", "etcd"),
                                               os.environ.get("DYN_REQUEST_PLANE", "tcp"),
                                               event_plane=os.environ.get("DYN_EVENT_PLANE"))
        except Exception as e:  # discovery unreachable, a bad DYN_* setting: one line, not a traceback
            raise MeshserveError(f"cannot join Dynamo: {e}") from None
        self._endpoint = endpoint = self._runtime.endpoint(self.address)
        if info.kv_events:
            self.kv = KVPublisher([KvEventPublisher(endpoint, kv_block_size=info.page_size, dp_rank=r,
                                                    enable_local_indexer=True) for r in range(info.replicas)],
                                  info.page_size)
        self._load = WorkerMetricsPublisher()
        await self._load.create_endpoint(endpoint)
        runtime_config = ModelRuntimeConfig()
        runtime_config.context_length = info.context_length
        runtime_config.total_kv_blocks = info.kv_pages
        runtime_config.max_num_seqs = info.max_num_seqs
        runtime_config.max_num_batched_tokens = info.max_num_batched_tokens
        runtime_config.enable_local_indexer = self.kv is not None
        runtime_config.kv_event_publishing_enabled = self.kv is not None
        card = model_card(info, Path(tempfile.gettempdir()))
        model_type = ModelType.Completions  # chat too when the checkpoint has a chat template
        if info.tokenizer.config.chat_template:
            model_type = ModelType.Chat | ModelType.Completions
        worker_type = {"both": WorkerType.Aggregated, "prefill": WorkerType.Prefill, "decode": WorkerType.Decode}[self.role]
        if self.role == "prefill":
            model_type = ModelType.Prefill  # no OpenAI surface of its own: the frontend's prefill router calls it
        needs = {"prefill": [[WorkerType.Decode]], "decode": [[WorkerType.Prefill]]}.get(self.role)  # its peers
        await register_model(ModelInput.Tokens, model_type, endpoint, str(card), self.model_name,
                             worker_type=worker_type, kv_cache_block_size=info.page_size,
                             runtime_config=runtime_config, needs=needs)
        log.warning("meshserve worker %s serving %s (role %s, page size %d, %d pages, context %d%s)", self.address,
                    self.model_name, self.role, info.page_size, info.kv_pages, info.context_length,
                    f", KV pages by {self.handoff.describe()}" if self.handoff else "")
        probe = {"token_ids": [info.tokenizer.bos_id or 0], "stop_conditions": {"max_tokens": 1},
                 "sampling_options": {"temperature": 0.0}}
        self._serving = asyncio.ensure_future(endpoint.serve_endpoint(
            self.generate, graceful_shutdown=True, metrics_labels=[("model", self.model_name)],
            health_check_payload=probe))

    async def health(self, serving: bool) -> None:
        """Not serving (draining, or the engine failed): leave discovery at once, so the frontend
        routes elsewhere; what is in flight still finishes."""
        if not serving and self._endpoint is not None:
            with contextlib.suppress(Exception):
                await self._endpoint.unregister_endpoint_instance()

    async def stop(self, grace: float) -> None:
        if self._runtime is not None:
            self._runtime.shutdown()
        if self._serving is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._serving, timeout=30.0)

    async def generate(self, request: dict[str, Any], context) -> AsyncIterator[dict[str, Any]]:
        """One request, token-in / token-out: a chunk of new token ids per engine step, the last with
        the finish reason and usage. Counted once in meshserve_requests_total by outcome."""
        async with self.host.session(time.monotonic()) as session:
            pre = self.host.serving()
            if pre is None:
                session.settle("unavailable")
                raise EngineUnavailable(self.host.unavailable())
            token_ids = [int(t) for t in request.get("token_ids") or ()]
            rid = str(context.id() or uuid.uuid4())
            try:
                refuse_unservable(request)
                params = sampling_params(request, len(token_ids), self.host.info.context_length,
                                         self.host.info.sampling_defaults)
                if params.guided is not None and self.role != "both":
                    raise RequestError("structured output is served by aggregated workers only (this worker's role "
                                       f"is {self.role}: its grammar state does not move with the KV)")
                if self.role == "prefill":  # the prompt's pages and one token: the decode worker does the rest
                    params = dataclasses.replace(params, max_tokens=1)
                # on the preprocessing threads: a constraint compiles there, never on the event loop
                checked = await pre.run(pre.check, token_ids, params, request_id=rid, arrival=session.arrival)
                if self.role == "decode":
                    await self.handoff.take(self.loop, token_ids, request)
                async with self.host.admitting():
                    await session.admit([checked])
            except QueueFullError as e:  # Dynamo retries another worker on an unavailable one
                session.fail(e)
                raise EngineUnavailable(str(e)) from None
            except RequestError as e:  # the frontend answers 400 with the message
                session.fail(e)
                from dynamo.llm.exceptions import InvalidArgument

                raise InvalidArgument(str(e)) from None
            except Exception as e:
                session.fail(e)
                raise
            stopped = asyncio.ensure_future(context.async_killed_or_stopped())
            stopped.add_done_callback(lambda f: None if f.cancelled() else self.loop.abort(rid, session.stream(rid)))
            completion = 0
            try:
                async for out in session.outputs(rid):
                    completion += len(out.token_ids)
                    chunk: dict[str, Any] = {"token_ids": list(out.token_ids), "index": 0}
                    if params.logprobs is not None and out.logprobs:
                        scored = out.logprobs[:len(out.token_ids)]
                        chunk["log_probs"] = [lp.logprob for lp in scored]
                        chunk["top_logprobs"] = [[{"rank": i + 1, "token_id": t, "token": None, "logprob": v}
                                                  for i, (t, v) in enumerate(lp.top)] for lp in scored]
                    if out.finished:
                        chunk["finish_reason"] = FINISH_REASONS.get(out.finish_reason, "stop")
                        chunk["completion_usage"] = {
                            "prompt_tokens": len(token_ids), "completion_tokens": completion,
                            "total_tokens": len(token_ids) + completion,
                            "prompt_tokens_details": {"cached_tokens": out.cached_tokens}}
                        if self.role == "prefill":
                            chunk["disaggregated_params"] = await self.handoff.offer(self.loop, token_ids)
                    yield chunk
            except MeshserveError as e:  # rejected in the queue, failed, or the engine unavailable
                session.fail(e)
                raise
            finally:
                stopped.cancel()


def run_worker(worker: Worker) -> int:
    """Run a worker until SIGTERM (0) or an engine failure (EXIT_ENGINE_FAILED)."""
    try:  # uvloop comes with Dynamo's runtime
        import dynamo.llm  # noqa: F401
        import uvloop
    except ImportError as e:
        raise MeshserveError(f"meshserve worker needs NVIDIA Dynamo ({e}): pip install -e '.[dynamo]' "
                             "&& pip install --no-deps ai-dynamo==1.6.1 (make does)") from None
    code = uvloop.run(worker.host.serve_forever())
    if worker.handoff is not None and worker.handoff.stuck:
        # a pull given up on is still blocked in jax's transfer library, which would abort the
        # process at exit: everything is cleaned up, so leave with the real exit code now
        log.warning("%d KV pull(s) still blocked at exit", worker.handoff.stuck)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
