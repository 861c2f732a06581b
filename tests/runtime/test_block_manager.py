import subprocess
import sys

import pytest

from meshserve.runtime.block_manager import NULL_PAGE, BlockManager


def test_grow_is_all_or_nothing_and_never_hands_out_the_null_page():
    bm = BlockManager(num_pages=5, page_size=4)  # pages 1..4 usable
    a, b = [], []
    assert bm.grow(a, 9) and len(a) == 3 and NULL_PAGE not in a
    assert not bm.grow(b, 8) and b == []  # needs 2, only 1 free: nothing taken
    assert bm.grow(b, 4) and bm.num_free == 0
    assert bm.grow(a, 12) and len(a) == 3  # still fits in 3 pages


def test_reference_counts():
    bm = BlockManager(num_pages=4, page_size=2)
    a = []
    bm.grow(a, 4)
    shared = list(a)
    bm.share(shared)
    bm.release(a)
    assert a == [] and bm.num_free == 1  # still referenced by `shared`
    bm.release(shared)
    assert bm.num_free == 3 and all(bm.ref_count(p) == 0 for p in range(4))
    with pytest.raises(ValueError, match="released more often"):
        bm.release([1])


def test_plain_python_without_jax():
    code = ("import sys, runtime.scheduler, runtime.block_manager; "
            "assert not any(m == 'jax' or m.startswith('jax.') for m in sys.modules), 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
