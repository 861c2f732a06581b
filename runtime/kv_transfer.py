"""Moving a prompt's KV pages from one engine to another (disaggregated prefill and decode).

The two sides agree on what a page holds by its name, not its number: a prompt's full pages are
named by the prefix cache's chained hashes, salted with the model's fingerprint. The prefill side
exports the pages it holds of a prompt; the decode side imports those it lacks into its own pool
and registers them in its prefix cache, where the request finds them when it is admitted. The
decode side computes only the prompt's last partial page and its last token, which samples the
first output token with the request's own seed and step: tokens are those of one engine doing both.

    skip = decode.held_prefix(ids)               # pages of the prompt it already holds: not moved
    pages = prefill.export_prompt(ids, skip)     # KVPages: names + device arrays [n, 2L, ps, K, E]
    decode.import_prompt(ids, pages)             # allocate, write, register
    decode.add_request(ids, params)              # a prefix hit: computes only the tail

In one process the arrays move with `jax.device_put` (`KVPages.to`); across processes with
jax.experimental.transfer (`TransferEndpoint`): the prefill side offers the arrays under an id, the
decode side pulls them, under our own deadline — the library's pull blocks for ever when the peer
died or never offered the id, so it runs on a helper thread that the caller stops waiting for. An
offer lapses after its own timeout (the pages are let go; a pull after that blocks, and fails by
the deadline).

Where that library is missing or its server cannot start, the pages go through a tensorstore
kvstore both sides open (`StoreEndpoint`: a shared folder, `gs://`, `s3://`…): the prefill side
writes each page under its name, the decode side reads the names it lacks. Slower than a
device-to-device pull, but it needs no server, works wherever both sides reach the store, and
outlives the prefill side: pages written before it died are still read. The values are the store
tier's (runtime/kv_tiers.py: checksummed, one per page, same keys), so an engine whose `kv_store`
is that store finds them as prefix-cache pages too.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import os
import threading
from typing import Any

import jax
import numpy as np

from meshserve.models.errors import MeshserveError
from meshserve.runtime.kv_tiers import TRANSFER_PAGES, StoreTier


class TransferError(MeshserveError):
    """KV pages could not be moved (a dead or stuck peer, an unknown id, pages of another model)."""


@dataclasses.dataclass(frozen=True)
class KVPages:
    """A prompt's pages `first`… (by index in the prompt), as device arrays of up to TRANSFER_PAGES
    pages each ([m, 2·layers, page_size, kv_heads, head_dim]; the last may be padded)."""

    hashes: tuple[bytes, ...]  # one per page, chained from the prompt's first page
    first: int  # index of the first page in the prompt
    arrays: tuple[jax.Array, ...]
    fingerprint: str  # the model's, hex (runtime/identity.py)

    def describe(self) -> dict[str, Any]:
        """What the other side needs to pull these (JSON-able)."""
        return {"hashes": [h.hex() for h in self.hashes], "first": self.first, "fingerprint": self.fingerprint,
                "shapes": [list(a.shape) for a in self.arrays], "dtype": str(self.arrays[0].dtype) if self.arrays else ""}

    def to(self, device) -> "KVPages":
        """The same pages on `device` (or a sharding): in one process, a device-to-device copy."""
        return dataclasses.replace(self, arrays=tuple(jax.device_put(a, device) for a in self.arrays))


@dataclasses.dataclass(frozen=True)
class Offer:
    """Where a prefill side holds pages for a pull, each array under its own id, so a puller can
    leave out the arrays of pages it holds (JSON-able via `as_dict`)."""

    address: str
    uuids: tuple[int, ...]  # one per array of `pages`
    pages: dict[str, Any]  # KVPages.describe()

    def as_dict(self) -> dict[str, Any]:
        return {"address": self.address, "uuids": list(self.uuids), "pages": self.pages}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Offer":
        return cls(str(data["address"]), tuple(int(u) for u in data["uuids"]), dict(data["pages"]))


class TransferEndpoint:
    """One process's jax.experimental.transfer server: it offers pages and pulls others' offers,
    keeping one connection per peer (a new connection costs ~0.5 s)."""

    def __init__(self, device=None, host: str = "127.0.0.1"):
        try:
            from jax.experimental import transfer
        except ImportError as e:  # pragma: no cover - a jax without it
            raise TransferError(f"this jax has no jax.experimental.transfer: {e}") from None
        self.device = device or jax.local_devices()[0]
        try:
            self._server = transfer.start_transfer_server(self.device.client, f"{host}:0", [f"{host}:0"])
        except Exception as e:  # an address this host does not have, a port it cannot bind
            raise TransferError(f"the KV transfer server cannot start on {host}: {e}") from None
        self.address = self._server.address()
        self._connections: dict[str, Any] = {}
        self._ids = itertools.count((os.getpid() & 0xFFFF) << 32)  # unique per process
        self._lock = threading.Lock()
        self._given_up: list[threading.Thread] = []

    def offer(self, pages: KVPages, timeout_s: float | None = None) -> Offer:
        """Hold `pages` until a pull fetches them, each array once, or `timeout_s` has passed (then
        the server lets them go: a decode side that never came or did not need them, a cancelled
        request). None: until pulled."""
        until = None if timeout_s is None else datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        uuids = []
        for array in pages.arrays:
            uuids.append(next(self._ids))
            if until is None:
                self._server.await_pull(uuids[-1], [array])
            else:
                self._server.await_pull(uuids[-1], [array], timeout=until)
        return Offer(self.address, tuple(uuids), pages.describe())

    @property
    def stuck(self) -> int:
        """Pulls given up on whose threads are still blocked in the library. While one is, the
        library aborts the process at interpreter exit: an owner that ends with `os._exit`
        after its own clean-up avoids that."""
        return sum(t.is_alive() for t in self._given_up)

    def pull(self, offer: Offer, timeout_s: float, skip: int = 0) -> KVPages:
        """The offered pages from the prompt's page `skip` on (the arrays holding only earlier pages
        are left: the puller holds those), on this endpoint's device; TransferError when they have
        not all arrived within `timeout_s` (the peer died, is stuck, or never offered an id)."""
        meta = offer.pages
        first, hashes = int(meta["first"]), tuple(bytes.fromhex(h) for h in meta["hashes"])
        start = next((i for i in range(len(offer.uuids)) if first + (i + 1) * TRANSFER_PAGES > skip),
                     len(offer.uuids))
        sharding = jax.sharding.SingleDeviceSharding(self.device)
        wanted = [(uuid, jax.ShapeDtypeStruct(tuple(shape), np.dtype(meta["dtype"]), sharding=sharding))
                  for uuid, shape in list(zip(offer.uuids, meta["shapes"]))[start:]]
        result: dict[str, Any] = {}

        def run():
            try:
                connection = self._connection(offer.address)
                result["arrays"] = [jax.block_until_ready(connection.pull(uuid, [spec]))[0] for uuid, spec in wanted]
            except Exception as e:  # a refused connection, a transfer that failed
                result["error"] = e

        name = f"KV pull {offer.uuids[start] if wanted else '-'} from {offer.address}"
        worker = threading.Thread(target=run, name=name, daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():  # the library cannot cancel it: the thread is left behind, blocked
            self._given_up = [t for t in self._given_up if t.is_alive()] + [worker]
            raise TransferError(f"{name} did not finish within {timeout_s} s")
        if "error" in result:
            raise TransferError(f"{name} failed: {result['error']}")
        return KVPages(hashes[start * TRANSFER_PAGES:], first + start * TRANSFER_PAGES, tuple(result["arrays"]),
                       str(meta["fingerprint"]))

    def _connection(self, address: str):
        with self._lock:
            connection = self._connections.get(address)
            if connection is None:
                connection = self._connections[address] = self._server.connect(address)
            return connection


class StoreEndpoint:
    """Pages handed over through a tensorstore kvstore both sides open (`spec`: a folder or a kvstore
    URL), for where jax.experimental.transfer is missing or cannot start. `offer` writes a prompt's
    pages under their names and returns once the writes are done; `pull` reads the ones a puller
    lacks. A page missing from the store, or failing its checksum, ends the pull there: the pages
    before it are returned, the rest is computed by the puller. Written pages stay in the store
    (it is a prefix-cache tier too); nothing here deletes them."""

    def __init__(self, spec: str, page_shape: tuple[int, ...], dtype):
        try:
            self._store = StoreTier(os.path.expanduser(spec), page_shape, dtype)
        except Exception as e:
            raise TransferError(f"the KV store {spec!r} cannot be opened: {e}") from None
        self._lock = threading.Lock()  # offers and pulls run on executor threads
        self.spec = spec

    def offer(self, pages: KVPages) -> dict[str, Any]:
        """Write `pages` (device or host arrays) to the store; what a puller needs (JSON-able)."""
        with self._lock:
            for b, array in enumerate(pages.arrays):
                host = np.asarray(array)
                for i, page_hash in enumerate(pages.hashes[b * TRANSFER_PAGES:(b + 1) * TRANSFER_PAGES]):
                    self._store.put(page_hash, host[i])
            self._store.flush()
            if not self._store.enabled:
                raise TransferError(f"a write to the KV store {self.spec!r} failed (see the log)")
        return {"transport": "store", "pages": pages.describe()}

    def pull(self, offer: dict[str, Any], skip: int = 0) -> KVPages:
        """The offered pages from the prompt's page `skip` on, as host arrays of TRANSFER_PAGES
        pages, as far as the store holds them in order; TransferError when it holds none."""
        meta = offer["pages"]
        first, hashes = int(meta["first"]), tuple(bytes.fromhex(h) for h in meta["hashes"])
        start = max(0, skip - first)
        read = []
        with self._lock:
            for page_hash in hashes[start:]:
                data = self._store.get(page_hash)
                if data is None:
                    break
                read.append(data)
        if not read and start < len(hashes):
            raise TransferError(f"page {hashes[start].hex()[:16]} is not in the KV store {self.spec!r}")
        arrays = []
        for i in range(0, len(read), TRANSFER_PAGES):
            pages = read[i:i + TRANSFER_PAGES]
            batch = np.zeros((TRANSFER_PAGES, *pages[0].shape), pages[0].dtype)  # the last one padded
            batch[:len(pages)] = pages
            arrays.append(batch)
        return KVPages(hashes[start:start + len(read)], first + start, tuple(arrays), str(meta["fingerprint"]))
