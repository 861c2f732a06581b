"""How a disaggregated worker picks its KV transports (serving/handoff.py), with real transfer servers
and a real store folder: the store stands in where jax.experimental.transfer's server cannot start,
and a worker that cannot move pages the way it was told to says so before it serves."""

import dataclasses

import pytest

from meshserve.models.errors import ConfigError
from meshserve.runtime.engine import Engine
from meshserve.serving.handoff import Handoff, HandoffConfig
from meshserve.serving.info import EngineInfo
from meshserve.serving.metrics import Metrics
from tests.runtime.kv_transfer_peer import CONFIG

UNBINDABLE = "203.0.113.1"  # an address this host does not have (TEST-NET-3)


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return Engine(tiny_ckpt, CONFIG)


def test_transports_chosen(engine, tmp_path):
    both = Handoff(HandoffConfig(store=str(tmp_path / "kv")), EngineInfo.of(engine), Metrics())
    assert both.transfer is not None and both.store is not None
    assert both.describe().startswith("transfer at 127.0.0.1:") and both.describe().endswith(f"store {tmp_path / 'kv'}")
    only_transfer = Handoff(HandoffConfig(), EngineInfo.of(engine), Metrics())
    assert only_transfer.store is None and only_transfer.transfer is not None
    fallback = Handoff(HandoffConfig(transfer_host=UNBINDABLE, store=str(tmp_path / "kv")), EngineInfo.of(engine),
                       Metrics())
    assert fallback.transfer is None and fallback.store is not None


def test_the_engine_configs_store_serves_when_no_store_is_named(tiny_ckpt, tmp_path):
    engine = Engine(tiny_ckpt, dataclasses.replace(CONFIG, kv_store=str(tmp_path / "kv")))
    handoff = Handoff(HandoffConfig(transport="store"), EngineInfo.of(engine), Metrics())
    assert handoff.transfer is None and handoff.store.spec == str(tmp_path / "kv")


@pytest.mark.parametrize("config,error", [
    (HandoffConfig(transport="transfer", transfer_host=UNBINDABLE), "cannot start on 203.0.113.1"),
    (HandoffConfig(transfer_host=UNBINDABLE), "cannot start on 203.0.113.1"),  # auto, but no store to fall back on
    (HandoffConfig(transport="store"), "needs a KV store"),
])
def test_a_worker_that_cannot_move_pages_says_why(engine, config, error):
    with pytest.raises(ConfigError, match=error):
        Handoff(config, EngineInfo.of(engine), Metrics())


@pytest.mark.parametrize("fields,error", [({"transport": "nccl"}, "must be one of auto, transfer, store"),
                                          ({"pull_timeout_s": 0}, "pull_timeout_s must be > 0"),
                                          ({"offer_timeout_s": -1}, "offer_timeout_s must be > 0")])
def test_bad_settings_are_named(fields, error):
    with pytest.raises(ConfigError, match=error):
        HandoffConfig(**fields)
