"""Disaggregated prefill and decode, the workers' side: how a `--role prefill` worker hands a
prompt's KV pages to a `--role decode` worker (docs/disaggregation.md).

    prefill worker                                         decode worker
    engine.export_prompt(ids) ── offer ─▶ Dynamo ─▶ prefill_result ── take ─▶ engine.import_prompt
                                 (disaggregated_params)

Two transports (runtime/kv_transfer.py):
  transfer  jax.experimental.transfer: the decode worker pulls the arrays device to device from the
            prefill worker's transfer server (one connection per peer, our own deadline per pull);
  store     a tensorstore kvstore both workers open (a shared folder, gs://, s3://…): the prefill
            worker writes each page under its name before it answers, the decode worker reads them.
`auto` (the default) uses the transfer server and falls back to the store, when one is set, where
that library is missing, its server cannot start, or an offer through it fails. A decode worker
takes whichever kind of offer it is handed.

Every failure on the decode side (a dead or stuck prefill worker, pages not in the store, another
model's pages) leaves the prompt to be computed there: slower, never wrong. Counted by role,
outcome and transport in meshserve_kv_transfers_total.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from meshserve.models.errors import ConfigError
from meshserve.runtime.kv_transfer import KVPages, Offer, StoreEndpoint, TransferEndpoint, TransferError
from meshserve.serving.engine_loop import EngineLoop
from meshserve.serving.info import EngineInfo
from meshserve.serving.metrics import Metrics

log = logging.getLogger("meshserve.handoff")

TRANSPORTS = ("auto", "transfer", "store")


@dataclasses.dataclass(frozen=True)
class HandoffConfig:
    transport: str = "auto"
    transfer_host: str = "127.0.0.1"  # where the transfer server listens
    store: str | None = None  # the kvstore both workers open; None: the engine config's kv_store
    pull_timeout_s: float = 30.0  # a decode worker's wait for one prompt's pages
    offer_timeout_s: float = 120.0  # how long offered arrays wait on the transfer server to be pulled

    def __post_init__(self):
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"kv transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        for name in ("pull_timeout_s", "offer_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")


class Handoff:
    """One worker's transports, opened for its engine; `offer` on a prefill worker, `take` on a
    decode worker. Runs on the worker's event loop; the engine is touched only through its loop."""

    def __init__(self, config: HandoffConfig, info: EngineInfo, metrics: Metrics):
        self.config, self.metrics = config, metrics
        self.transfer: TransferEndpoint | None = None
        self.store: StoreEndpoint | None = None
        store = config.store or info.kv_store
        if config.transport in ("auto", "transfer"):
            try:
                self.transfer = TransferEndpoint(info.device, config.transfer_host)
            except TransferError as e:
                if config.transport == "transfer" or store is None:
                    raise ConfigError(f"{e} (set a KV store for the store transport)") from None
                log.warning("%s: KV pages go through the store %s instead", e, store)
        if config.transport in ("auto", "store"):
            if store is None:
                if config.transport == "store":
                    raise ConfigError("the store transport needs a KV store: --kv-transfer-store, or kv_store "
                                      "in the engine config")
            else:
                self.store = StoreEndpoint(store, info.kv_page_shape, info.kv_page_dtype)

    @property
    def stuck(self) -> int:
        """Pulls given up on, still blocked in jax's transfer library (see TransferEndpoint.stuck)."""
        return self.transfer.stuck if self.transfer is not None else 0

    def describe(self) -> str:
        return " + ".join(filter(None, (self.transfer and f"transfer at {self.transfer.address}",
                                        self.store and f"store {self.store.spec}"))) or "none"

    # ---- prefill worker ---------------------------------------------------------------------------

    async def offer(self, loop: EngineLoop, token_ids: list[int]) -> dict[str, Any]:
        """The prompt's pages, copied out of the pool and offered; what the decode worker needs to
        take them (Dynamo hands it over as the request's prefill_result). Empty when they cannot
        be offered at all: the decode worker then computes the prompt itself."""
        try:
            pages = await loop.call(lambda engine: engine.export_prompt(token_ids))
        except Exception as e:
            return self._offer_failed("-", e)
        if self.transfer is not None:
            try:
                # one addressable buffer per array (a multi-device engine's copies gathered to one device)
                offer = self.transfer.offer(pages.to(self.transfer.device), self.config.offer_timeout_s).as_dict()
                return self._offered("transfer", pages, offer)
            except Exception as e:
                if self.store is None:
                    return self._offer_failed("transfer", e)
                log.warning("KV pages could not be offered through the transfer server (%s: %s): writing them "
                            "to the store", type(e).__name__, e)
        try:
            offer = await asyncio.get_running_loop().run_in_executor(None, self.store.offer, pages)
        except Exception as e:
            return self._offer_failed("store", e)
        return self._offered("store", pages, offer)

    def _offered(self, transport: str, pages: KVPages, offer: dict[str, Any]) -> dict[str, Any]:
        self.metrics.kv_transfers.labels("prefill", "offered", transport).inc()
        self.metrics.kv_transfer_pages.labels("prefill").inc(len(pages.hashes))
        self.metrics.kv_transfer_bytes.labels("prefill").inc(sum(a.nbytes for a in pages.arrays))
        return {"meshserve": offer}

    def _offer_failed(self, transport: str, e: Exception) -> dict[str, Any]:
        log.warning("KV pages of a prompt could not be offered: %s: %s", type(e).__name__, e)
        self.metrics.kv_transfers.labels("prefill", "failed", transport).inc()
        return {}

    # ---- decode worker ----------------------------------------------------------------------------

    async def take(self, loop: EngineLoop, token_ids: list[int], request: dict[str, Any]) -> None:
        """Fetch the prompt's pages a prefill worker offered (leaving out the ones this engine holds)
        and put them in its prefix cache, so the request computes only its tail. Any failure leaves
        the prompt to be computed here, counted."""
        prefill = request.get("prefill_result") or {}
        offered = (prefill.get("disaggregated_params") or {}).get("meshserve")
        if not offered:
            return
        transport = "store" if offered.get("transport") == "store" else "transfer"
        try:
            held = await loop.call(lambda engine: engine.held_prefix(token_ids))  # not fetched again
            started = time.perf_counter()
            pages = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
                None, self._fetch, transport, offered, held), self.config.pull_timeout_s + 1)
            self.metrics.kv_pull_seconds.observe(time.perf_counter() - started)
            await loop.call(lambda engine: engine.import_prompt(token_ids, pages))
        except Exception as e:
            log.warning("KV pages could not be taken from the prefill worker (computing the prompt here): "
                        "%s: %s", type(e).__name__, e)
            self.metrics.kv_transfers.labels("decode", "failed", transport).inc()
            return
        self.metrics.kv_transfers.labels("decode", "pulled", transport).inc()
        self.metrics.kv_transfer_pages.labels("decode").inc(len(pages.hashes))
        self.metrics.kv_transfer_bytes.labels("decode").inc(sum(a.nbytes for a in pages.arrays))

    def _fetch(self, transport: str, offered: dict[str, Any], held: int) -> KVPages:
        if transport == "store":
            if self.store is None:
                raise TransferError("pages offered through a KV store, but this worker has none")
            return self.store.pull(offered, held)
        if self.transfer is None:
            raise TransferError("pages offered through jax.experimental.transfer, which this worker cannot use")
        return self.transfer.pull(Offer.from_dict(offered), self.config.pull_timeout_s, held)
