"""The checks that a run fits its devices: its training state before anything is allocated, its compiled step before
the step first runs."""

import re
import types
from pathlib import Path

import jax
import pytest
from flax import nnx

from cli_run import cache_dir  # noqa: F401 (a fixture)
from llama_jax import checkpoint, goodput, memory, trainer, workdir as workdir_lib
from llama_jax.config import default_config, model_section
from llama_jax.convert import load_hf, save_hf
from llama_jax.errors import ConfigError
from llama_jax.parallel.mesh import make_mesh


class _Device:
    device_kind = "NVIDIA H100 80GB HBM3"
    platform = "gpu"

    def __init__(self, stats: dict | None):
        self.stats = stats

    def memory_stats(self) -> dict | None:
        return self.stats


def _config(data_cache: Path):
    cfg = default_config()
    cfg.model = model_section("debug", vocab_size=1024)
    cfg.data.cache_dir = str(data_cache)
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    return cfg


def _device_bytes(tree) -> int:
    """What the first device really holds of a tree of arrays."""
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def test_the_counted_state_is_what_the_devices_hold(tmp_path, cache_dir):
    cfg = _config(cache_dir)
    run = trainer.setup(cfg, tmp_path / "run")
    state = run.init()
    parts = trainer._state_bytes(cfg, run.model_def, run.abstract_state, run.base_shardings)
    assert parts == {"parameters": _device_bytes(state.params), "gradients": _device_bytes(state.params),
                     "optimizer": _device_bytes(state.opt_state)}
    assert parts["optimizer"] >= 2 * parts["parameters"] > 0, "AdamW: two moments per parameter"
    replicated = _config(cache_dir)
    replicated.mesh.data, replicated.mesh.fsdp = 8, 1
    whole = trainer._state_bytes(replicated, run.model_def, trainer.setup(replicated, tmp_path).abstract_state, None)
    assert 3 * parts["parameters"] < whole["parameters"] <= 4 * parts["parameters"], "fsdp=4: about a quarter each"


def test_a_state_that_cannot_fit_is_refused_before_the_run_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "device_memory_bytes", lambda devices: (2**16, "each device can hold 0.00 GiB"))
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"the training state, before any activation, needs 0\.\d\d GiB per device "
                                          r"\(parameters 0\.\d\d, gradients 0\.\d\d, optimizer 0\.\d\d GiB\), but each "
                                          r"device can hold 0\.00 GiB: train a smaller model or LoRA adapters"):
        trainer.train(_config(tmp_path / "cache"), workdir)  # a cache of its own, to see that none is built
    assert [p.name for p in workdir.iterdir()] == [".lock"], "nothing read, built or written"
    assert not (tmp_path / "cache").exists()


def test_device_memory_is_the_allocator_limit_or_the_hosts_free_memory_shared():
    assert memory.device_memory_bytes([_Device({"bytes_limit": 60 * 2**30})]) == (
        60 * 2**30, "each NVIDIA H100 80GB HBM3 can hold 60.00 GiB")
    one, said = memory.device_memory_bytes(jax.local_devices()[:1])
    available = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemAvailable:")).split()[1]) * 1024
    assert 0 < one <= available * 1.05 and said.startswith("the host has")
    eight, said = memory.device_memory_bytes(jax.local_devices())
    assert len(jax.local_devices()) == 8 and eight == pytest.approx(one / 8, rel=0.05)
    assert said.endswith(f"shared by 8 CPU devices, give each {eight / 2**30:.2f} GiB")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir) -> Path:
    """A one-step run and its Hugging Face export (`hf/` inside it)."""
    root = tmp_path_factory.mktemp("trained")
    cfg = _config(cache_dir)
    cfg.train.steps, cfg.checkpoint.every_steps, cfg.train.eval_every = 1, 1, 0
    trainer.train(cfg, root / "run")
    save_hf(checkpoint.load_model(root / "run")[0], root / "run" / "hf")
    return root / "run"


def test_a_model_too_large_to_load_is_refused_before_any_tensor_is_read(trained, monkeypatch):
    """generate, evaluate and rejection sampling open checkpoints through these loaders."""
    model, _ = checkpoint.load_model(trained)
    needed = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    monkeypatch.setattr(memory, "device_memory_bytes", lambda devices: (needed - 1, "each device can hold less"))
    message = rf"the model's parameters need {needed / 2**30:.2f} GiB per device, but each device can hold less: " \
              r"use accelerators or a machine with more memory \(CPU devices share the host's, so --mesh does not"
    for load in (lambda: checkpoint.load_model(trained), lambda: load_hf(trained / "hf")):
        with pytest.raises(ConfigError, match=message):
            load()
    mesh = make_mesh({"data": 1, "stage": 1, "fsdp": 8, "context": 1, "tensor": 1})
    assert checkpoint.load_model(trained, mesh=mesh)[0].cfg == model.cfg, "an eighth on each device fits"
    monkeypatch.setattr(memory, "device_memory_bytes", lambda devices: (needed, "each device can hold enough"))
    assert load_hf(trained / "hf").cfg.n_layers == model.cfg.n_layers


def test_a_lora_run_counts_its_adapters_as_trained_and_its_frozen_base(trained, tmp_path, cache_dir):
    cfg = _config(cache_dir)
    cfg.checkpoint.init_from, cfg.data.tokenizer = str(trained), str(trained / "tokenizer.model")
    cfg.lora.rank, cfg.lora.base_dtype = 4, "bfloat16"
    run = trainer.setup(cfg, tmp_path / "lora")
    state = run.init()
    parts = trainer._state_bytes(cfg, run.model_def, run.abstract_state, run.base_shardings)
    assert parts == {"parameters": _device_bytes(state.params), "gradients": _device_bytes(state.params),
                     "optimizer": _device_bytes(state.opt_state), "frozen base": _device_bytes(run.base)}
    assert parts["frozen base"] > parts["parameters"] > 0, "the adapters train; the base is held, in bfloat16"


def test_the_fix_named_depends_on_whether_sharding_helps():
    """Sharding over CPU devices, which share one host's memory, frees nothing; over accelerators it does."""
    for devices, fix in (([_Device({"bytes_limit": 2**30})], "shard it over more devices (mesh.fsdp)"),
                         (jax.local_devices(), "CPU devices share the host's, so sharding over them does not help")):
        with pytest.raises(ConfigError, match=re.escape(fix)):
            memory.check_train_state_fits({"parameters": 2**50}, devices)


def test_a_step_that_cannot_fit_is_refused_once_compiled_before_it_runs(tmp_path, cache_dir, monkeypatch, capsys):
    """The state fits (the first check passes), but the step's activations do not. A step that fits logs its
    figures."""
    cfg = _config(cache_dir)
    cfg.train.steps = 1
    trainer.train(cfg, tmp_path / "fits")
    assert re.search(r"\nMemory: the compiled training step needs, for its activations and other temporaries, "
                     r"0\.\d\d GiB per device, and the host's \d+\.\d\d GiB free, shared by 8 CPU devices, give each "
                     r"\d+\.\d\d GiB\n", capsys.readouterr().out)
    run = trainer.setup(cfg, tmp_path)
    limit = sum(trainer._state_bytes(cfg, run.model_def, run.abstract_state, None).values())
    monkeypatch.setattr(memory, "device_memory_bytes", lambda devices: (limit, "each device can hold little"))
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"the compiled training step needs, for its activations and other "
                                          r"temporaries, \d+\.\d\d GiB per device, but each device can hold little: "
                                          r"lower what a step holds at once: optim.grad_accum=N"):
        trainer.train(cfg, workdir)
    assert workdir_lib.read_jsonl(workdir / "metrics.jsonl") == [], "no step ran"
    assert not list((workdir / "checkpoints").glob("*")), "nothing saved"
    # no start recorded: the corrected rerun's goodput counted the time since this attempt as lost to restarts
    assert not (workdir / goodput.START_FILE).exists() and (tmp_path / "fits" / goodput.START_FILE).exists()


def _compiled(**sizes_gib: float):
    stats = types.SimpleNamespace(**{f"{name}_size_in_bytes": int(size * 2**30) for name, size in sizes_gib.items()})
    return types.SimpleNamespace(memory_analysis=lambda: stats)


def test_a_compiled_step_must_fit_whole_on_an_accelerator_and_on_top_of_its_arguments_on_a_cpu(monkeypatch):
    """An accelerator's allocator holds the arguments, the results not aliased to them and the temporaries; a CPU
    host already holds the arguments, and its free memory does not count them."""
    step = _compiled(argument=10, output=4, alias=3, temp=20)
    with pytest.raises(ConfigError, match=re.escape(
            "the compiled training step needs 31.00 GiB per device (state and batch 10.00, activations and other "
            "temporaries 21.00 GiB), but each NVIDIA H100 80GB HBM3 can hold 30.00 GiB: shard over more devices "
            "(mesh.fsdp), or lower what a step holds at once: optim.grad_accum=N")):
        memory.check_step_fits(step, [_Device({"bytes_limit": 30 * 2**30})])
    memory.check_step_fits(step, [_Device({"bytes_limit": 31 * 2**30})])
    cpu = jax.local_devices()[:1]
    monkeypatch.setattr(memory, "_host_available_bytes", lambda: 21 * 2**30)
    memory.check_step_fits(step, cpu)
    monkeypatch.setattr(memory, "_host_available_bytes", lambda: 21 * 2**30 - 1)
    with pytest.raises(ConfigError, match=r"needs, for its activations and other temporaries, 21.00 GiB per device, "
                                          r"but the host has 21.00 GiB free: .*sharding over them does not help"):
        memory.check_step_fits(step, cpu)
    memory.check_step_fits(types.SimpleNamespace(memory_analysis=lambda: None), cpu)  # no analysis: nothing to check
