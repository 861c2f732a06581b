import jax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from meshserve.sharding.rules import partition_spec


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)


def test_heads_and_mlp_split_over_tensor(mesh):
    assert partition_spec(("embed", "q_heads", "head_dim"), (64, 8, 16), mesh) == P(None, "tensor", None)
    assert partition_spec(("mlp", "embed"), (128, 64), mesh) == P("tensor", None)


def test_indivisible_dimension_is_replicated(mesh):
    assert partition_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == P(None, None, None)


def test_one_mesh_axis_used_once(mesh):
    assert partition_spec(("vocab", "mlp"), (8, 8), mesh) == P("tensor", None)


def test_errors(mesh):
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'colour'"):
        partition_spec(("colour",), (4,), mesh)
    with pytest.raises(ValueError, match="rank"):
        partition_spec(("embed",), (4, 4), mesh)
