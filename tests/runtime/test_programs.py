"""The default program set (runtime/programs.py `Buckets`): what the shipped config compiles."""

from meshserve.runtime.programs import Buckets, geometric


def test_geometric_always_ends_at_its_limit():
    assert geometric(64, 256, 2) == (64, 128, 256)
    assert geometric(64, 200, 2) == (64, 128, 200)
    assert geometric(1, 16, 4) == (1, 4, 16)
    assert geometric(32, 32, 2) == (32,)


def test_the_shipped_config_compiles_seven_programs():
    """configs/serving/default.yaml: chunks of 256, 16 sequences, 16 prompt tokens a step while
    decoding. Prefill ×2 from 64 (a 92-token uncached tail pays for 128, not 256), decode ×4."""
    buckets = Buckets.default(max_prefill_chunk=256, max_num_seqs=16, max_pages=128, replicas=1,
                              prefill_while_decoding=16)
    assert buckets.prefill_tokens == (16, 64, 128, 256)
    assert buckets.decode_batch == (1, 4, 16)
    assert buckets.context_pages == (128,)
    assert [(family, rows, tokens) for family, rows, tokens, _ in buckets.shapes(16)] == [
        ("prefill", 2, 16), ("prefill", 8, 64), ("prefill", 16, 128), ("prefill", 16, 256),
        ("decode", 1, 1), ("decode", 4, 1), ("decode", 16, 1)]


def test_decode_buckets_are_multiples_of_the_data_replicas():
    buckets = Buckets.default(max_prefill_chunk=32, max_num_seqs=8, max_pages=8, replicas=2)
    assert buckets.prefill_tokens == (32,)
    assert buckets.decode_batch == (2, 8)
    assert Buckets.pick(buckets.prefill_tokens, 20) == 32
