"""Time and seeds of one process (the agreed versions run in tests/sharding/test_multihost.py)."""

from meshserve.runtime.clock import Clock, MeshClock, Seeds, clock_for


def test_one_process_reads_its_own_clock_and_keeps_its_values():
    clock = clock_for(1)
    assert type(clock) is Clock and clock.agree(12345) == 12345
    a, b = clock.now(), clock.now()
    assert b >= a
    assert isinstance(clock_for(2), MeshClock)


def test_seeds_follow_the_base_and_the_request_id():
    seeds = Seeds(Clock())
    assert seeds.for_request("r1") == seeds.for_request("r1")
    assert seeds.for_request("r1") != seeds.for_request("r2")
    assert all(0 <= seeds.for_request(f"r{i}") < 2**31 for i in range(100))
    assert Seeds(Clock()).for_request("r1") != seeds.for_request("r1")  # a new engine, a new base
