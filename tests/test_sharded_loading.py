"""Sharded loading: with a mesh, Hugging Face and Orbax checkpoints land straight in their shards, equal to the
unsharded load bitwise, without any device or host buffer ever holding a whole stacked parameter."""

import collections
import contextlib
import dataclasses
import math

import grain
import jax
import numpy as np
import pytest
import transformers
from flax import nnx

from hf_reference import random_hf_llama
from test_convert import OURS, hf_model, our_logits

from llama_jax import convert
from llama_jax.checkpoint import Checkpointer, load_model
from llama_jax.convert import _weights, load_hf, load_hf_params
from llama_jax.generate import generate, parse_mesh
from llama_jax.parallel.mesh import make_mesh, param_shardings

MESHES = ["fsdp=4,tensor=2", "data=2,fsdp=4", "stage=2,fsdp=2,tensor=2"]


def params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def assert_sharded_copy(model, whole, mesh) -> None:
    """Every parameter of `model` is placed as param_shardings says, split into shards smaller than the whole, and
    equal bitwise to the one in `whole`."""
    expected = param_shardings(nnx.state(model), mesh)
    for got, sharding, reference in zip(*map(jax.tree.leaves, (params(model), expected, params(whole))), strict=True):
        assert got.sharding == sharding
        shard_shape = sharding.shard_shape(got.shape)
        assert math.prod(shard_shape) < math.prod(got.shape)  # every parameter has an embed axis, split over fsdp
        assert {shard.data.shape for shard in got.addressable_shards} == {shard_shape}
        np.testing.assert_array_equal(np.asarray(got), np.asarray(reference))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_sharded")
    hf_model().save_pretrained(path, max_shard_size="50KB")  # several files, as large checkpoints come
    return path


@pytest.fixture(scope="module")
def whole(hf_dir):
    return load_hf(hf_dir)


@pytest.mark.parametrize("spec", MESHES)
def test_load_hf_reads_each_parameter_into_its_shards(hf_dir, whole, spec):
    mesh = make_mesh(parse_mesh(spec))
    model = load_hf(hf_dir, mesh=mesh)
    assert_sharded_copy(model, whole, mesh)
    # not bitwise: the sharded matmuls sum in another order
    np.testing.assert_allclose(our_logits(model), our_logits(whole), rtol=0, atol=1e-5)


def test_load_hf_params_takes_the_train_state_shardings(hf_dir, whole):
    mesh = make_mesh(parse_mesh("fsdp=4,tensor=2"))
    shardings = param_shardings(nnx.state(whole), mesh)
    loaded = load_hf_params(hf_dir, whole.cfg, shardings=shardings)
    for got, sharding, reference in zip(*map(jax.tree.leaves, (loaded, shardings, params(whole))), strict=True):
        assert got.sharding == sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(reference))


def test_read_block_equals_the_block_of_the_whole_conversion():
    """Random blocks of every kind of weight, including ones that split head_dim inside HF's flattened rows."""
    rng = np.random.default_rng(0)
    for weight in _weights(OURS):
        hf = rng.normal(size=weight.hf_shape).astype(np.float32)
        ours = weight.to_ours(hf)
        np.testing.assert_array_equal(weight.to_hf(ours), hf)
        for _ in range(20):
            block = []
            for size in ours.shape:
                start = rng.integers(0, size)
                block.append(range(start, rng.integers(start + 1, size + 1)))
            np.testing.assert_array_equal(weight.read_block(hf, block), ours[np.ix_(*block)])


class _SpyHandle:
    """A safetensors file that reports the bytes of every tensor (part) read from it to `on_read(name, nbytes)`."""

    def __init__(self, handle, on_read):
        self._handle, self._on_read = handle, on_read

    def keys(self):
        return self._handle.keys()

    def get_tensor(self, name):
        tensor = self._handle.get_tensor(name)
        self._on_read(name, tensor.nbytes)
        return tensor

    def get_slice(self, name):
        handle, on_read = self._handle, self._on_read

        class Slice:
            def get_shape(self):
                return handle.get_slice(name).get_shape()

            def get_dtype(self):
                return handle.get_slice(name).get_dtype()

            def __getitem__(self, index):
                part = handle.get_slice(name)[index]
                on_read(name, part.nbytes)
                return part

        return Slice()


def test_a_model_larger_than_one_device_share_loads_without_any_whole_tensor(tmp_path, monkeypatch):
    """The model does not fit the quarter of it that one device may hold on fsdp=4 x tensor=2, yet loads: each device
    holds at most that quarter, no read from the files takes more than a quarter of an HF tensor, and host memory
    holds one shard at a time: between two copies to devices no more than one shard is read. (Reading whole tensors
    fails the second check; gathering every shard before sending any, as jax.make_array_from_callback does, the
    third.)"""
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    random_hf_llama(cfg).save_pretrained(tmp_path)
    mesh = make_mesh(parse_mesh("fsdp=4,tensor=2"))
    reads, sent, pending = [], [], [0]  # pending: bytes read since the last copy to a device

    def on_read(name, nbytes):
        reads.append((name, nbytes, pending[0] + nbytes))
        pending[0] += nbytes

    real_open, real_put = convert.safe_open, jax.device_put

    @contextlib.contextmanager
    def spy_open(file, framework):
        with real_open(file, framework=framework) as handle:
            yield _SpyHandle(handle, on_read)

    def spy_put(x, *args, **kwargs):
        if isinstance(x, np.ndarray):
            sent.append(x.nbytes)
            pending[0] = 0
        return real_put(x, *args, **kwargs)

    monkeypatch.setattr(convert, "safe_open", spy_open)
    monkeypatch.setattr(jax, "device_put", spy_put)
    model = load_hf(tmp_path, mesh=mesh)
    monkeypatch.undo()

    per_device = collections.Counter()
    for param in jax.tree.leaves(params(model)):
        for shard in param.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    total = sum(param.nbytes for param in jax.tree.leaves(params(model)))
    assert len(per_device) == 8 and max(per_device.values()) <= total / 4

    file_bytes = {w.hf_name.format(i=i): math.prod(w.hf_shape) * 4  # float32 in the files
                  for w in _weights(model.cfg) for i in range(model.cfg.n_layers)}
    assert reads and all(nbytes <= file_bytes[name] / 4 for name, nbytes, _ in reads), max(reads, key=lambda r: r[1])
    largest_shard = max(math.prod(p.sharding.shard_shape(p.shape)) * 4 for p in jax.tree.leaves(params(model)))
    assert max(before_sending for _, _, before_sending in reads) <= largest_shard
    assert sent and max(sent) <= largest_shard


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory, whole):
    """A workdir with one checkpoint written by the trainer's Checkpointer (the loaded HF weights as parameters)."""
    workdir = tmp_path_factory.mktemp("run")
    checkpointer = Checkpointer(workdir / "checkpoints", async_save=False)
    data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
    meta = {"config": {"model": dataclasses.asdict(whole.cfg)}, "tokenizer_file": "tokenizer.json"}
    checkpointer.save(1, params(whole), {"count": np.zeros((), np.int32)}, data_iter, meta)
    checkpointer.close()
    return workdir


@pytest.mark.parametrize("spec", MESHES)
def test_load_model_restores_each_parameter_into_its_shards(training_checkpoint, whole, spec):
    mesh = make_mesh(parse_mesh(spec))
    model, tokenizer = load_model(training_checkpoint, mesh=mesh)
    unsharded, _ = load_model(training_checkpoint)
    assert_sharded_copy(model, unsharded, mesh)
    assert_sharded_copy(model, whole, mesh)
    assert tokenizer == str(training_checkpoint / "tokenizer.json")


def test_greedy_generation_on_a_mesh_equals_one_device(hf_dir, whole):
    mesh = make_mesh(parse_mesh("fsdp=4,tensor=2"))
    prompts = [[3, 17, 42, 9, 100], [250, 1, 77]]
    on_mesh = generate(load_hf(hf_dir, mesh=mesh), prompts, 16, mesh=mesh)
    assert on_mesh == generate(whole, prompts, 16)
    assert len(set(on_mesh[0])) > 3  # a real continuation
