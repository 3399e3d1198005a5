"""The mesh from cfg.mesh, and the one logical-axis → mesh-axis table, on 8 fake CPU devices (conftest.py)."""

import itertools

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax.config import default_config
from llama_jax.errors import ConfigError
from llama_jax.model import LlamaConfig
from llama_jax.parallel import mesh as mesh_lib
from llama_jax.parallel.mesh import LOGICAL_RULES, MESH_AXES, logical_to_spec, make_mesh, mesh_shape
from llama_jax.model import ModelDef

LOGICAL_NAMES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers")


def mesh_cfg(**sizes) -> dict[str, int]:
    return {**{axis: 1 for axis in MESH_AXES}, **sizes}


def spec_axes(spec: P) -> list[str]:
    """Every mesh axis a spec uses, flattened (a dimension may use a tuple of axes)."""
    axes = []
    for entry in spec:
        if entry is None:
            continue
        axes.extend(entry if isinstance(entry, tuple) else (entry,))
    return axes


def test_eight_fake_devices():
    assert jax.device_count() == 8


# ---------------------------------------------------------------------------------------------- mesh_shape


def test_mesh_shape_resolves_minus_one():
    assert mesh_shape(mesh_cfg(data=-1), 8) == dict(data=8, stage=1, fsdp=1, context=1, tensor=1)
    assert mesh_shape(mesh_cfg(data=2, fsdp=-1, tensor=2), 8)["fsdp"] == 2
    assert mesh_shape(mesh_cfg(tensor=-1, fsdp=4), 8)["tensor"] == 2
    assert mesh_shape(mesh_cfg(data=-1, fsdp=8), 8)["data"] == 1
    assert list(mesh_shape(mesh_cfg(data=-1), 8)) == list(MESH_AXES)


def test_mesh_shape_accepts_the_default_config_section():
    assert mesh_shape(default_config().mesh, 8) == dict(data=8, stage=1, fsdp=1, context=1, tensor=1)
    assert mesh_shape(default_config().mesh, 1)["data"] == 1


def test_mesh_shape_explicit_product_must_match_devices():
    sizes = mesh_cfg(data=2, fsdp=2, tensor=2)
    assert mesh_shape(sizes, 8) == dict(data=2, stage=1, fsdp=2, context=1, tensor=2)
    with pytest.raises(ConfigError) as info:
        mesh_shape(mesh_cfg(data=2, fsdp=2), 8)
    message = str(info.value)
    for fragment in ("data=2", "fsdp=2", "needs 4 devices", "8"):
        assert fragment in message, message
    with pytest.raises(ConfigError, match="16"):
        mesh_shape(mesh_cfg(data=4, fsdp=2, tensor=2), 8)


def test_mesh_shape_minus_one_needs_a_divisor():
    with pytest.raises(ConfigError) as info:
        mesh_shape(mesh_cfg(data=-1, fsdp=3), 8)
    assert "3" in str(info.value) and "8" in str(info.value)
    with pytest.raises(ConfigError):
        mesh_shape(mesh_cfg(data=-1, fsdp=16), 8)  # more than there are


def test_mesh_shape_rejects_two_free_axes():
    with pytest.raises(ConfigError) as info:
        mesh_shape(mesh_cfg(data=-1, fsdp=-1), 8)
    assert "data" in str(info.value) and "fsdp" in str(info.value)


@pytest.mark.parametrize("axis, size", [("tensor", 0), ("fsdp", -2), ("data", 0)])
def test_mesh_shape_rejects_non_positive_sizes(axis, size):
    with pytest.raises(ConfigError) as info:
        mesh_shape(mesh_cfg(**{axis: size}), 8)
    assert f"mesh.{axis}={size}" in str(info.value)


# ---------------------------------------------------------------------------------------------- make_mesh


def test_make_mesh_data_fsdp_tensor():
    mesh = make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == dict(data=2, stage=1, fsdp=2, context=1, tensor=2)
    assert mesh.devices.shape == (2, 1, 2, 1, 2)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    # tensor is the innermost axis: on this flat CPU "topology" its pairs are neighbouring devices
    pairs = mesh.devices.reshape(-1, 2)
    assert all(abs(a.id - b.id) == 1 for a, b in pairs)


def test_make_mesh_on_a_subset_of_devices():
    one = make_mesh(mesh_cfg(data=-1), devices=jax.devices()[:1])
    assert dict(one.shape) == dict(data=1, stage=1, fsdp=1, context=1, tensor=1)
    assert one.devices.flat[0] == jax.devices()[0]
    four = make_mesh(mesh_cfg(data=-1, tensor=2), devices=jax.devices()[4:])
    assert dict(four.shape)["data"] == 2
    assert {d.id for d in four.devices.flat} == {d.id for d in jax.devices()[4:]}


def test_make_mesh_rejects_a_mesh_that_does_not_fit():
    with pytest.raises(ConfigError, match="8"):
        make_mesh(mesh_cfg(data=4, tensor=4))


def test_a_sharded_array_lands_where_the_spec_says():
    mesh = make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
    x = jax.device_put(jax.numpy.zeros((8, 6)), NamedSharding(mesh, logical_to_spec(("batch", "vocab"))))
    assert {s.data.shape for s in x.addressable_shards} == {(2, 3)}  # batch over data x fsdp = 4, vocab over tensor = 2


# ---------------------------------------------------------------------------------------------- logical rules


def test_every_rule_maps_to_mesh_axes():
    names = [name for name, _ in LOGICAL_RULES]
    assert len(names) == len(set(names)), "a logical name has two rules"
    assert set(names) == set(LOGICAL_NAMES)
    for _, target in LOGICAL_RULES:
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        assert set(targets) <= set(MESH_AXES)


@pytest.mark.parametrize(
    "names, expected",
    [
        (("batch", "length"), P(("data", "fsdp"), "context")),
        (("embed",), P("fsdp")),
        (("vocab", "embed"), P("tensor", "fsdp")),
        (("embed", "vocab"), P("fsdp", "tensor")),
        (("layers", "embed", "heads", "head_dim"), P("stage", "fsdp", "tensor", None)),
        (("layers", "heads", "head_dim", "embed"), P("stage", "tensor", None, "fsdp")),
        (("layers", "embed", "mlp"), P("stage", "fsdp", "tensor")),
        (("layers", "mlp", "embed"), P("stage", "tensor", "fsdp")),
        ((None, "embed"), P(None, "fsdp")),
        # an axis already used is not used again: batch takes fsdp first, so embed stays whole
        (("batch", "length", "embed"), P(("data", "fsdp"), "context", None)),
        (("embed", "batch"), P("fsdp", "data")),
        (("heads", "kv_heads"), P("tensor", None)),
        (("batch", "length", "heads", "head_dim"), P(("data", "fsdp"), "context", "tensor", None)),
    ],
)
def test_logical_to_spec(names, expected):
    assert logical_to_spec(names) == expected


def test_logical_to_spec_never_uses_an_axis_twice():
    for n in (1, 2, 3, 4):
        for names in itertools.product(LOGICAL_NAMES + (None,), repeat=n):
            spec = logical_to_spec(names)
            assert len(spec) == n
            axes = spec_axes(spec)
            assert len(axes) == len(set(axes)), (names, spec)


def test_logical_to_spec_unknown_name():
    with pytest.raises(ConfigError, match="'experts'"):
        logical_to_spec(("experts", "embed"))


def test_logical_to_spec_custom_rules():
    rules = (("embed", ("fsdp", "tensor")), ("mlp", "tensor"))
    assert logical_to_spec(("embed", "mlp"), rules) == P(("fsdp", "tensor"), None)
    assert logical_to_spec(("mlp", "embed"), rules) == P("tensor", "fsdp")


def test_batch_sharding_and_replicated():
    mesh = make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
    assert mesh_lib.batch_sharding(mesh).spec == P(("data", "fsdp"), "context")
    assert mesh_lib.replicated(mesh).spec == P()


# ---------------------------------------------------------------------------------------------- parameters

EXPECTED_PARAM_SPECS = {
    ("embed",): P("tensor", "fsdp"),
    ("lm_head",): P("fsdp", "tensor"),
    ("norm", "scale"): P("fsdp"),
    ("layers", "attn_norm", "scale"): P("stage", "fsdp"),
    ("layers", "mlp_norm", "scale"): P("stage", "fsdp"),
    ("layers", "attn", "wq"): P("stage", "fsdp", "tensor", None),
    ("layers", "attn", "wk"): P("stage", "fsdp", "tensor", None),
    ("layers", "attn", "wv"): P("stage", "fsdp", "tensor", None),
    ("layers", "attn", "wo"): P("stage", "tensor", None, "fsdp"),
    ("layers", "mlp", "w_gate"): P("stage", "fsdp", "tensor"),
    ("layers", "mlp", "w_up"): P("stage", "fsdp", "tensor"),
    ("layers", "mlp", "w_down"): P("stage", "tensor", "fsdp"),
}


def flatten(tree) -> dict[tuple[str, ...], object]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
    return {tuple(k.key for k in path): leaf for path, leaf in leaves}


@pytest.mark.parametrize("tie", [False, True])
def test_param_shardings_have_the_right_rank_and_axes(tie):
    cfg = LlamaConfig(vocab_size=512, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=128,
                      tie_embeddings=tie)
    model_def = ModelDef(cfg)
    mesh = make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
    shardings = flatten(mesh_lib.param_shardings(model_def.abstract_state, mesh))
    abstract = flatten(nnx.to_pure_dict(model_def.abstract_state))
    expected = {k: v for k, v in EXPECTED_PARAM_SPECS.items() if not (tie and k == ("lm_head",))}
    assert set(shardings) == set(expected) == set(abstract)
    for path, sharding in shardings.items():
        assert sharding.mesh is mesh
        assert len(sharding.spec) == abstract[path].ndim, (path, sharding.spec, abstract[path].shape)
        assert sharding.spec == expected[path], path
        axes = spec_axes(sharding.spec)
        assert len(axes) == len(set(axes)), path
        for dim, entry in zip(abstract[path].shape, sharding.spec):  # every split dimension divides evenly
            parts = 1 if entry is None else mesh.shape[entry] if isinstance(entry, str) else \
                int(np.prod([mesh.shape[a] for a in entry]))
            assert dim % parts == 0, (path, abstract[path].shape, sharding.spec)
    # stacked parameters carry the layer axis first (from nnx.vmap's transform_metadata), split over pipeline stages
    assert abstract[("layers", "attn", "wq")].shape == (3, 64, 4, 16)
    assert abstract[("layers", "mlp", "w_down")].shape == (3, 192, 64)


def test_a_dimension_its_mesh_axes_do_not_divide_stays_whole():
    """2 KV heads on tensor=4: k and v keep both heads on every device (Megatron's replicated KV heads), q splits."""
    cfg = LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=192, max_seq_len=128)
    shardings = flatten(mesh_lib.param_shardings(ModelDef(cfg).abstract_state, make_mesh(mesh_cfg(data=2, tensor=4))))
    assert shardings[("layers", "attn", "wk")].spec == P("stage", "fsdp", None, None)
    assert shardings[("layers", "attn", "wq")].spec == P("stage", "fsdp", "tensor", None)


def test_a_multislice_mesh_puts_the_data_axis_across_slices():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class SliceDevice:  # what the hybrid layout reads of a TPU device
        id: int
        slice_index: int
        platform: str = "cpu"
        device_kind: str = "cpu"
        process_index: int = 0

    devices = [SliceDevice(i, i // 4) for i in range(8)]
    grid = mesh_lib.multislice_grid((2, 1, 2, 1, 2), devices, slices=2)
    slice_of = np.vectorize(lambda d: d.slice_index)(grid)
    assert slice_of.shape == (2, 1, 2, 1, 2)
    assert (slice_of[0] == 0).all() and (slice_of[1] == 1).all(), "each data index lies within one slice"
    with pytest.raises(ConfigError, match=r"mesh.data \(1\) must be a multiple of 2"):
        mesh_lib.multislice_grid((1, 1, 4, 1, 2), devices, slices=2)
