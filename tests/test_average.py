"""Checkpoint averaging: the output is the element-wise mean of the inputs, loads as a checkpoint, and refuses
inputs that are not one model."""

import dataclasses
import re

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from flax import nnx

from test_convert import add_tokenizer, convert_cli, hf_model

from llama_jax import trainer
from llama_jax.average import main
from llama_jax.checkpoint import Checkpointer, load_model
from llama_jax.errors import CheckpointError
from llama_jax.model import LlamaConfig, ModelDef

CFG = LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, dtype="float32")


def random_params(seed: int, cfg: LlamaConfig = CFG, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    abstract = nnx.to_pure_dict(ModelDef(cfg).abstract_state)
    return jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(dtype), abstract)


def save_step(workdir, step: int, params: dict, cfg: LlamaConfig = CFG) -> None:
    """A step as the trainer saves it (parameters as jax arrays, an optimizer state, the data position), with the
    tokenizer file beside it."""
    checkpointer = Checkpointer(workdir / "checkpoints", async_save=False, max_to_keep=10)
    meta = {"config": {"model": dataclasses.asdict(cfg)}, "tokenizer_file": "tokenizer.model"}
    data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
    checkpointer.save(step, jax.tree.map(jnp.asarray, params), {"count": np.zeros((), np.int32)}, data_iter, meta)
    checkpointer.close()
    add_tokenizer(workdir)


def loaded_params(path) -> dict:
    model, _ = load_model(path)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def numpy_mean(trees: list[dict], dtype) -> dict:
    return jax.tree.map(lambda *xs: np.mean(np.stack(xs).astype(np.float64), axis=0).astype(dtype), *trees)


def assert_trees_equal(got: dict, expected: dict) -> None:
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected), strict=True):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def run(*args) -> int:
    return main([str(arg) for arg in args])


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_average_is_the_elementwise_mean_and_loads(tmp_path, capsys, dtype):
    cfg = CFG.replace(param_dtype=jnp.dtype(dtype).name)
    inputs = [random_params(seed, cfg, dtype) for seed in range(3)]
    for step, params in zip((100, 200, 300), inputs):
        save_step(tmp_path / "run", step, params, cfg)
    steps = [tmp_path / "run" / "checkpoints" / str(step) for step in (100, 200)]
    assert run(*steps, tmp_path / "run", "--out", tmp_path / "avg") == 0  # the workdir means its latest step, 300
    assert "the mean of 3 checkpoints" in capsys.readouterr().out
    assert_trees_equal(loaded_params(tmp_path / "avg"), numpy_mean(inputs, dtype))
    assert (tmp_path / "avg" / "tokenizer.model").read_bytes() == (tmp_path / "run" / "tokenizer.model").read_bytes()


def test_dtype_rounds_the_float64_mean_once(tmp_path):
    inputs = [random_params(seed) for seed in range(2)]
    for seed, params in enumerate(inputs):
        save_step(tmp_path / f"run{seed}", 1, params)
    assert run(tmp_path / "run0", tmp_path / "run1", "--out", tmp_path / "avg", "--dtype", "bfloat16") == 0
    assert_trees_equal(loaded_params(tmp_path / "avg"), numpy_mean(inputs, jnp.bfloat16))


def test_one_checkpoint_gives_a_copy(tmp_path, capsys):
    params = random_params(0)
    save_step(tmp_path / "run", 5, params)
    assert run(tmp_path / "run", "--out", tmp_path / "copy") == 0
    assert "a copy of the one checkpoint given" in capsys.readouterr().out
    assert_trees_equal(loaded_params(tmp_path / "copy"), params)


def test_hugging_face_directories_are_averaged_too(tmp_path):
    hf_model().save_pretrained(tmp_path / "hf")
    add_tokenizer(tmp_path / "hf")
    convert_cli("--from", "hf", "--to", "ours", tmp_path / "hf", tmp_path / "ours")
    assert run(tmp_path / "hf", tmp_path / "ours", "--out", tmp_path / "avg") == 0
    assert_trees_equal(loaded_params(tmp_path / "avg"), loaded_params(tmp_path / "ours"))  # the mean of equals


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    save_step(root / "a", 1, random_params(0))
    wider = CFG.replace(ffn_dim=96, n_kv_heads=4)
    save_step(root / "wider", 1, random_params(1, wider), wider)
    save_step(root / "bf16_compute", 1, random_params(2), CFG.replace(dtype="bfloat16", remat="full"))
    save_step(root / "other_tokenizer", 1, random_params(3))
    (root / "other_tokenizer" / "tokenizer.model").write_text("YQ== 0\n")
    convert_cli("--from", "ours", "--to", "hf", root / "a", root / "a_hf")  # the same tokenizer as a tokenizer.json
    return root


def test_runtime_settings_may_differ(runs, tmp_path):
    assert run(runs / "a", runs / "bf16_compute", "--out", tmp_path / "avg") == 0


ERRORS = {
    "other_model": (["{runs}/a", "{runs}/wider"],
                    r"wider is a different model from .*a \(model.n_kv_heads=2 \(checkpoint: 4\); model.ffn_dim=128 "
                    r"\(checkpoint: 96\)\): average checkpoints of one run"),
    "other_tokenizer": (["{runs}/a", "{runs}/other_tokenizer"], "other_tokenizer has another tokenizer than .*a"),
    "export_beside_run": (["{runs}/a", "{runs}/a_hf"],
                          r"a_hf holds its tokenizer as tokenizer.json and .*a as tokenizer.model, which this command "
                          r"cannot compare: average checkpoints of one format"),
    "missing": (["{runs}/a", "{runs}/nowhere"], "nowhere does not exist"),
    "one_checkpoint_twice": (["{runs}/a", "{runs}/a/checkpoints/1"],
                             r"a/checkpoints/1 and .*a are the same checkpoint \(.*a/checkpoints/1\), which would "
                             "count twice in the mean"),
    "into_a_run": (["{runs}/a", "--out", "{runs}/a"], r"a already holds checkpoints \(steps 1\)"),
    "into_a_step": (["{runs}/a", "--out", "{runs}/a/checkpoints/1"],
                    r"a/checkpoints/1 is a checkpoint step of a run .*: write to a new directory"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_averaging_refuses_clearly(runs, tmp_path, capsys, case):
    args, expected = ERRORS[case]
    args = [arg.format(runs=runs) for arg in args]
    assert main(args if "--out" in args else [*args, "--out", str(tmp_path / "avg")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(expected, err), err
    assert not (tmp_path / "avg").exists()


def test_a_multi_host_run_writes_its_average_in_a_process_of_its_own(tmp_path):
    """Orbax's writes wait for every process of a multi-host job, and there the trainer's process 0 averaged a phase's
    checkpoints while the others waited for it: a hang, until the watchdog ended the run. Process 0 now runs
    `python -m llama_jax.average` in a child process (`trainer._average_alone`); its failure is one error."""
    params = [random_params(seed) for seed in (0, 1)]
    for step, tree in zip((1, 2), params):
        save_step(tmp_path / "run", step, tree)
    steps = [tmp_path / "run" / "checkpoints" / str(step) for step in (1, 2)]
    trainer._average_alone(steps, epath.Path(tmp_path / "averaged"))
    assert_trees_equal(loaded_params(tmp_path / "averaged"), numpy_mean(params, np.float32))
    with pytest.raises(CheckpointError, match=r"averaging the checkpoints .* into .*again failed \(error: .*missing"):
        trainer._average_alone([steps[0], tmp_path / "missing"], epath.Path(tmp_path / "again"))
