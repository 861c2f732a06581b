"""Request checks and limits, by hand: no engine needed."""

import pytest

from meshserve.models.errors import ConfigError, RequestError
from meshserve.runtime.engine import EngineConfig
from meshserve.runtime.request import RequestLimits, check_request
from meshserve.runtime.sampling import SamplingParams

FACTS = dict(vocab_size=100, max_seq_len=32, priority_levels=3)


def test_limits_come_from_the_engine_config():
    config = EngineConfig.from_dict({"limits": {"max_stop_strings": 4, "max_stop_token_ids": 8}})
    assert config.limits == RequestLimits(max_stop_strings=4, max_stop_string_chars=1024, max_stop_token_ids=8)
    with pytest.raises(ConfigError, match=r"engine config limits: unknown field\(s\) max_stops"):
        EngineConfig.from_dict({"limits": {"max_stops": 4}})
    with pytest.raises(ConfigError, match="limits.max_stop_strings must be a positive integer"):
        EngineConfig.from_dict({"limits": {"max_stop_strings": 0}})


@pytest.mark.parametrize("params,message", [
    (SamplingParams(stop=("a",) * 5), "stop: 5 stop strings, at most 4 allowed"),
    (SamplingParams(stop=("a" * 11,)), "stop: a stop string of 11 characters, at most 10 allowed"),
    (SamplingParams(stop_token_ids=(1,) * 9), "stop_token_ids: 9 ids, at most 8 allowed"),
    (SamplingParams(min_p=float("-inf")), "min_p must be a finite number"),
    (SamplingParams(max_tokens=2.5), "max_tokens must be an integer"),
    (SamplingParams(logprobs=True), "logprobs must be in"),
])
def test_each_limit_is_named(params, message):
    limits = RequestLimits(max_stop_strings=4, max_stop_string_chars=10, max_stop_token_ids=8)
    with pytest.raises(RequestError, match=message):
        check_request([1, 2], params, 0, limits=limits, **FACTS)
    check_request([1, 2], SamplingParams(max_tokens=4, stop=("a" * 10,) * 4, stop_token_ids=(1,) * 8), 0,
                  limits=limits, **FACTS)


def test_a_huge_prompt_fails_on_its_length_before_its_ids_are_read():
    class Unreadable(list):
        def __iter__(self):
            raise AssertionError("every id was read")

    with pytest.raises(RequestError, match="prompt of 1000000 tokens does not fit the context of 32"):
        check_request(Unreadable([0] * 1_000_000), SamplingParams(), 0, **FACTS)
