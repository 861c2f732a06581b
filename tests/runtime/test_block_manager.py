import subprocess
import sys

import pytest

from meshserve.runtime.block_manager import NULL_PAGE, BlockManager


def test_grow_is_all_or_nothing_returns_a_new_table_and_never_hands_out_the_null_page():
    bm = BlockManager(num_pages=5, page_size=4)  # pages 1..4 usable
    a = bm.grow([], 9)
    assert len(a) == 3 and NULL_PAGE not in a
    assert bm.grow([], 8) is None and bm.num_free == 1  # needs 2, only 1 free: nothing taken
    b = bm.grow([], 4)
    assert len(b) == 1 and bm.num_free == 0
    same = bm.grow(a, 12)
    assert same == a and same is not a  # still fits in 3 pages; the caller's list is never edited


def test_reference_counts():
    bm = BlockManager(num_pages=4, page_size=2)
    a = bm.grow([], 4)
    bm.share(a)
    bm.release(a)
    assert bm.num_free == 1  # still referenced once
    bm.release(a)
    assert bm.num_free == 3 and all(bm.ref_count(p) == 0 for p in range(4))
    with pytest.raises(ValueError, match="released more often"):
        bm.release([1])


def test_plain_python_without_jax():
    code = ("import sys, runtime.scheduler, runtime.block_manager, runtime.kv_manager; "
            "assert not any(m == 'jax' or m.startswith('jax.') for m in sys.modules), 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
