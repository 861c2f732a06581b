"""The scheduler by hand: plans are small enough to write out exactly."""

import pytest

from meshserve.runtime.kv_manager import KVManager
from meshserve.runtime.scheduler import QueueFull, Scheduler, SchedulerConfig, Sequence, Status


def make(num_pages=64, page_size=4, **cfg):
    return Scheduler(SchedulerConfig(**cfg), KVManager(num_pages, page_size))


def seq(rid, n, priority=0, arrival=0.0):
    return Sequence(rid, list(range(n)), n, priority=priority, arrival=arrival)


def run(sched, plan):
    """What the engine does with a plan: dispatch (a token sampled where due), commit once the
    programs ran, then read the tokens back."""
    sampled = [c.seq for c in plan.prefills if c.samples] + list(plan.decodes)
    for s in sampled:
        sched.sampling(s)
    sched.commit(plan)
    for s in sampled:
        sched.accept(s, 7)


def test_chunked_prefill_under_the_token_budget():
    sched = make(max_num_batched_tokens=8, max_prefill_chunk=8, max_num_seqs=4)
    a = seq("a", 20)
    sched.add(a)
    spans = []
    for _ in range(3):
        plan = sched.schedule(0)
        spans += [(c.start, c.end, c.samples) for c in plan.prefills]
        run(sched, plan)
    assert spans == [(0, 8, False), (8, 16, False), (16, 20, True)]
    plan = sched.schedule(0)
    assert plan.decodes == (a,) and a.num_computed == 20 and len(a.pages) == 6  # 21 tokens / 4


def test_decodes_keep_their_token_when_a_prompt_arrives():
    sched = make(max_num_batched_tokens=6, max_prefill_chunk=6, max_num_seqs=4)
    a, b = seq("a", 3), seq("b", 30, arrival=1.0)
    sched.add(a)
    run(sched, sched.schedule(0))  # a prefilled
    sched.add(b)
    plan = sched.schedule(0)
    assert plan.decodes == (a,)
    assert [(c.seq.request_id, c.end - c.start) for c in plan.prefills] == [("b", 5)]


def test_prompt_tokens_are_limited_while_requests_decode():
    sched = make(max_num_batched_tokens=64, max_prefill_chunk=32, max_num_seqs=4, prefill_tokens_while_decoding=5)
    a, b, c = seq("a", 3), seq("b", 30, arrival=1.0), seq("c", 9, arrival=2.0)
    sched.add(a)
    plan = sched.schedule(0)
    assert [(x.end - x.start) for x in plan.prefills] == [3]  # nothing decodes yet: no limit
    run(sched, plan)
    sched.add(b)
    sched.add(c)
    spans = []
    while b.num_computed < 30:
        plan = sched.schedule(0)
        assert a in plan.decodes and sum(x.end - x.start for x in plan.prefills) <= 5
        spans.append([(x.seq.request_id, x.end - x.start) for x in plan.prefills])
        run(sched, plan)
    assert spans[:2] == [[("b", 5)], [("b", 5)]] and len(spans) == 6  # 30 tokens, 5 a step
    assert c.status is Status.WAITING  # a newcomer waits behind them: no budget left this step


def test_priority_then_arrival():
    sched = make(max_num_seqs=1)
    for s in (seq("late-low", 2, priority=2, arrival=0), seq("high", 2, priority=0, arrival=5),
              seq("early-mid", 2, priority=1, arrival=1), seq("late-mid", 2, priority=1, arrival=2)):
        sched.add(s)
    order = []
    while sched.waiting:
        plan = sched.schedule(0)
        order.append(plan.prefills[0].seq.request_id)
        sched.remove(plan.prefills[0].seq)
    assert order == ["high", "early-mid", "late-mid", "late-low"]


def test_preemption_takes_the_least_entitled_and_recomputes():
    sched = make(num_pages=5, page_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_prefill_chunk=64)
    a, b = seq("a", 8, arrival=0), seq("b", 8, arrival=1)  # 2 pages each: pool of 4 is full
    sched.add(a), sched.add(b)
    run(sched, sched.schedule(0))
    assert sched.kv.num_free == 0
    plan = sched.schedule(0)  # both need a third page for token 9: b (newer) gives way
    assert plan.preempted == (b,) and plan.decodes == (a,)
    assert b.status is Status.WAITING and b.num_computed == 0 and b.pages == [] and b.num_preemptions == 1
    assert len(b.tokens) == 9  # its generated token is kept and will be recomputed


def test_queue_bound_and_timeout():
    sched = make(max_queue_size=2, queue_timeout_s=1.0, max_num_seqs=1)
    sched.add(seq("a", 2, arrival=0)), sched.add(seq("b", 2, arrival=0))
    with pytest.raises(QueueFull, match="full"):
        sched.add(seq("c", 2))
    plan = sched.schedule(now=0.5)  # a runs; b waits
    assert [c.seq.request_id for c in plan.prefills] == ["a"]
    plan = sched.schedule(now=2.0)
    assert [s.request_id for s in plan.expired] == ["b"] and not sched.waiting


def test_config_errors():
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="queue_timeout_s"):
        SchedulerConfig(queue_timeout_s=0)


def test_per_request_queue_timeout_overrides_the_default():
    sched = make(max_num_seqs=1, queue_timeout_s=None)
    sched.add(seq("runs", 2, arrival=0))
    patient, hasty = seq("patient", 2, arrival=0), seq("hasty", 2, arrival=0)
    hasty.queue_timeout_s = 0.5
    sched.add(patient), sched.add(hasty)
    sched.schedule(now=0.1)
    plan = sched.schedule(now=1.0)
    assert [s.request_id for s in plan.expired] == ["hasty"]
    assert [s.request_id for s in sched.waiting] == ["patient"]


def caching(rid="a", n=10):
    """A prefix-caching scheduler with one request planned: (scheduler, its KV manager, the request, the plan)."""
    kv = KVManager(64, 4, prefix_caching=True, salt=b"m")
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_prefill_chunk=16), kv)
    a = seq(rid, n)
    sched.add(a)
    return sched, kv, a, sched.schedule(0)


def test_a_plan_registers_cached_pages_only_when_committed():
    sched, blocks, a, plan = caching()
    assert plan.prefills[0].end == 10 and blocks.num_cached == 0 and a.num_computed == 0
    sched.commit(plan)  # its programs ran: two full pages become findable, a has computed 10 tokens
    assert blocks.num_cached == 2 and a.num_computed == 10 and a.num_registered == 2
    b = seq("b", 10)  # the same tokens: a later request finds them
    sched.add(b)
    sched.schedule(0)
    assert b.num_cached == 8


def test_a_request_dropped_before_its_step_ran_registers_nothing():
    sched, blocks, a, plan = caching()
    sched.remove(a)  # the engine fails it while building the step
    sched.commit(plan)
    assert blocks.num_cached == 0 and blocks.num_free == blocks.num_usable


def test_a_preempted_request_expires_like_any_waiting_one():
    sched = make(num_pages=5, page_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_prefill_chunk=64,
                 queue_timeout_s=1.0)
    a, b = seq("a", 8, arrival=0), seq("b", 8, arrival=1)
    sched.add(a), sched.add(b)
    run(sched, sched.schedule(0.5))
    plan = sched.schedule(1.5)  # b is preempted at 1.5 and waits again, counted from then
    assert plan.preempted == (b,)
    run(sched, plan)
    assert sched.next_expiry() == 2.5
    assert sched.schedule(2.4).expired == ()
    plan = sched.schedule(2.6)
    assert plan.expired == (b,) and b.status is Status.FINISHED and not sched.waiting


def test_a_sampled_token_counts_from_dispatch_and_joins_the_tokens_when_read_back():
    sched = make(max_num_batched_tokens=16, max_prefill_chunk=16)
    a = seq("a", 5)
    sched.add(a)
    plan = sched.schedule(0)
    sched.sampling(a)  # dispatched: its next token is on the device
    sched.commit(plan)
    assert (a.total, len(a.tokens), a.uncomputed) == (6, 5, 1)
    plan = sched.schedule(0)  # async: the next step decodes it before the host has it
    assert plan.decodes == (a,) and plan.decodes[0].num_computed == 5
    sched.sampling(a)
    sched.accept(a, 11)  # the first step read back
    sched.commit(plan)
    assert a.tokens == [0, 1, 2, 3, 4, 11] and a.num_sampling == 1 and a.num_computed == 6
    sched.accept(a, 12)
    with pytest.raises(ValueError, match="no sampled token"):
        sched.accept(a, 13)


def test_a_request_whose_copies_in_fail_leaves_the_step_and_computes_from_there():
    class Index:
        def holds(self, h):
            return True  # every page of the prompt is in the lower tier

    kv = KVManager(64, 4, prefix_caching=True, salt=b"m", lower=Index())
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_prefill_chunk=64), kv)
    a, b = seq("a", 21), seq("b", 9, arrival=1.0)
    sched.add(a), sched.add(b)
    plan = sched.schedule(0)
    assert [o.index for o in plan.onboard if o.seq is a] == [0, 1, 2, 3, 4] and a.num_computed == 20
    plan = sched.recompute_from(plan, {a: 2})  # its third page could not be read
    assert a.num_computed == a.num_cached == 8 and len(a.page_hashes) == 2 and len(a.pages) == 6
    assert [c.seq for c in plan.prefills] == [b] and all(o.seq is b for o in plan.onboard)
    assert a.status is Status.RUNNING
    run(sched, plan)
    plan = sched.schedule(0)  # next step: a computes from its third page on
    chunk = next(c for c in plan.prefills if c.seq is a)
    assert (chunk.start, chunk.end) == (8, 21) and not [o for o in plan.onboard if o.seq is a]


def test_small_requests_pass_one_that_does_not_fit_a_bounded_number_of_times():
    """A request whose first chunk needs more pages than are free lets at most max_bypass later
    requests start ahead of it; then the queue waits for it, and it runs once pages come back."""
    sched = make(num_pages=12, page_size=4, max_num_batched_tokens=64, max_prefill_chunk=64, max_num_seqs=8,
                 max_bypass=2)
    hog = seq("hog", 24)  # 6 of the 12 pages (11 usable: one is the null page)
    sched.add(hog)
    run(sched, sched.schedule(0))
    big = seq("big", 30, arrival=1.0)  # 8 pages: does not fit the 5 free
    smalls = [seq(f"s{i}", 3, arrival=2.0 + i) for i in range(3)]  # a page each
    for s in (big, *smalls):
        sched.add(s)
    plan = sched.schedule(0)
    assert [c.seq.request_id for c in plan.prefills] == ["s0", "s1"] and big.bypassed == 2
    assert [s.request_id for s in sched.waiting] == ["big", "s2"]
    run(sched, plan)
    for s in smalls[:2]:
        sched.remove(s)
    assert [c.seq.request_id for c in sched.schedule(0).prefills] == []  # s2 fits, but big was passed twice
    sched.remove(hog)
    assert [c.seq.request_id for c in sched.schedule(0).prefills] == ["big", "s2"]


def test_strict_order_with_no_bypass():
    sched = make(num_pages=12, page_size=4, max_num_batched_tokens=64, max_prefill_chunk=64, max_num_seqs=8,
                 max_bypass=0)
    hog, big, small = seq("hog", 24), seq("big", 30, arrival=1.0), seq("small", 3, arrival=2.0)
    sched.add(hog)
    run(sched, sched.schedule(0))
    sched.add(big)
    sched.add(small)
    assert sched.schedule(0).prefills == () and [s.request_id for s in sched.waiting] == ["big", "small"]
