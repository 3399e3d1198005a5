"""The config schema: defaults and configs/ validate; every user mistake is a ConfigError naming the key.

Two subprocess tests check the CLI end of it (about 5 s each, mostly imports): a bad override stops the run
with exit code 2 and one readable `error:` line, before any data is prepared.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from config_files import load_config_file
from posttrain_fixtures import tiny_base

from llama_jax import command_line
from llama_jax.config import (
    OBJECTIVES,
    batch_schedule,
    default_config,
    eval_source,
    pretrained_model_section,
    mixture_source,
    model_config,
    model_section,
    validate,
)
from llama_jax.convert import config_to_hf
from llama_jax.data.recipes import llama3_mixture
from llama_jax.errors import ConfigError, LlamaJaxError
from llama_jax.model import preset

REPO = Path(__file__).resolve().parents[1]


def with_value(cfg: ml_collections.ConfigDict, key: str, value) -> ml_collections.ConfigDict:
    """A copy of `cfg` with `key` (dotted) set to `value` of any type, as a config file built from a dict could.

    ConfigDict refuses to change a field's type on assignment, so the copy is rebuilt from a plain dict.
    """
    d = cfg.to_dict()
    *sections, leaf = key.split(".")
    node = d
    for section in sections:
        node = node[section]
    node[leaf] = value
    return ml_collections.ConfigDict(d)


def assert_config_error(cfg, *fragments: str) -> str:
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in ConfigError message {message!r}"
    return message


# ---------------------------------------------------------------------------------------------- valid configs


def test_default_config_validates():
    cfg = default_config()
    validate(cfg)
    model = model_config(cfg)
    assert model.n_heads % model.n_kv_heads == 0
    assert cfg.data.seq_len <= model.max_seq_len


def test_public_keys_exist():
    """The names DESIGN.md promises to users and scripts."""
    cfg = default_config()
    for key in ("seed", "train.steps", "train.log_every", "train.eval_every", "checkpoint.every_steps",
                "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.stage", "mesh.context", "optim.lr",
                "data.batch_size", "data.seq_len", "objective.name"):
        node = cfg
        for part in key.split("."):
            assert part in node, f"public config key {key!r} is missing"
            node = node[part]
    assert set(OBJECTIVES) == {"lm", "sft", "reward", "dpo"}


def test_tiny_config_file_validates():
    cfg = load_config_file("tiny.py")
    validate(cfg)
    assert cfg.model.attention == "xla"
    assert cfg.train.steps > 0


def test_every_config_file_validates_and_reading_it_writes_nothing(tmp_path, monkeypatch):
    """The post-training configs built their data when read, in ~/.cache/llama_jax, before the command line's
    --config.data.cache_dir applied (a read-only home stopped them); a built-in name is prepared when the run starts."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    files = sorted(p.name for p in (REPO / "configs").glob("*.py") if not p.name.startswith("_"))
    assert "tiny.py" in files
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(preset("debug"), "float32")))
    base = str(tiny_base(tmp_path / "base"))  # a Hugging Face directory with Llama 3's chat tokens
    arguments = {"finetune.py": [str(tmp_path)], "sft_tiny.py": [base], "dpo_tiny.py": [base],
                 "reward_tiny.py": [base]}  # they read a checkpoint
    for name in files:
        cfg = load_config_file(name, *arguments.get(name, []))
        try:
            validate(cfg)
        except ConfigError as err:  # a config file for a feature not built yet must say so, not crash
            assert "not available yet" in str(err), f"configs/{name}: {err}"
    assert not (tmp_path / "home").exists()


def test_the_mixture_config_on_prepared_shards_names_the_script_that_makes_them(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'none'} is not a directory of prepared shards: make it first "
                                          f"with `bash data/prepare_stdlib_mix.sh {tmp_path / 'none'}`"):
        load_config_file("stdlib_mix.py", str(tmp_path / "none"))
    cfg = load_config_file("stdlib_mix.py", str(tmp_path))
    assert cfg.data.mixture.stdlib.source == f"{tmp_path}/stdlib"
    assert cfg.data.tokenizer == f"{tmp_path}/tokenizer.model"


def test_the_llama3_mixture_gives_the_paper_s_shares_to_the_four_sources_given():
    cfg = default_config()
    cfg.data.mixture = llama3_mixture(general="web/", math_reasoning="math/*.jsonl", code="code/", multilingual="ml/",
                                      text_field="body")
    validate(cfg)
    assert cfg.data.mixture.to_dict() == {
        "general": {"source": "web/", "weight": 0.50, "text_field": "body"},
        "math_reasoning": {"source": "math/*.jsonl", "weight": 0.25, "text_field": "body"},
        "code": {"source": "code/", "weight": 0.17, "text_field": "body"},
        "multilingual": {"source": "ml/", "weight": 0.08, "text_field": "body"},
    }


def test_finetune_config_takes_its_model_from_the_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(preset("debug", tie_embeddings=True), "bfloat16")))
    cfg = load_config_file("finetune.py", str(tmp_path))
    debug = preset("debug", tie_embeddings=True)
    assert model_config(cfg) == debug.replace(head_dim=debug.resolved_head_dim, dtype="bfloat16", param_dtype="float32")
    assert cfg.checkpoint.init_from == cfg.data.tokenizer == str(tmp_path)
    assert pretrained_model_section(str(tmp_path), dtype="float32").dtype == "float32"
    with pytest.raises(ConfigError, match=r"needs the checkpoint: --config configs/finetune.py:PATH"):
        load_config_file("finetune.py")
    with pytest.raises(LlamaJaxError, match="does not exist"):
        load_config_file("finetune.py", str(tmp_path / "missing"))


@pytest.mark.parametrize("options", ["zzz", "devices=x", "scale=", "bogus=3"])
def test_the_tiny_recipe_refuses_an_option_it_does_not_know(options):
    """Each was a ValueError traceback, or (an unknown name) taken silently."""
    assert len(load_config_file("llama3_recipe_tiny.py", "devices=2,scale=0.08").phases) == 5
    with pytest.raises(ConfigError, match=rf"option '{options}' is not devices=N \(an integer\) or scale=F"):
        load_config_file("llama3_recipe_tiny.py", options)


def test_model_section_overrides_and_validates():
    cfg = default_config()
    cfg.model = model_section("debug", dtype="float32")
    validate(cfg)
    assert model_config(cfg).dtype == "float32"
    assert model_config(cfg).vocab_size == 512


def test_int_accepted_for_float_key():
    cfg = default_config()
    cfg.optim.lr = 1  # an int where a float goes is fine (e.g. --config.optim.lr=1)
    validate(cfg)


# ---------------------------------------------------------------------------------------------- mistakes


def test_unknown_key_suggests_the_right_one():
    cfg = default_config()
    cfg.data.batchsize = 3  # ConfigDict is unlocked here, so a typo silently adds a key
    message = assert_config_error(cfg, "data.batchsize", "data.batch_size")
    assert "did you mean" in message


def test_unknown_top_level_key_and_section():
    cfg = default_config()
    cfg.sed = 1
    assert_config_error(cfg, "'sed'", "seed")
    cfg = default_config()
    cfg.optimizer = ml_collections.ConfigDict({"lr": 1e-3})
    assert_config_error(cfg, "optimizer")


def test_unknown_key_without_close_match_lists_known_keys():
    cfg = default_config()
    cfg.mesh.zzzz = 2
    assert_config_error(cfg, "mesh.zzzz", "fsdp", "tensor")


def test_unknown_model_key():
    cfg = default_config()
    cfg.model.n_head = 8
    assert_config_error(cfg, "model.n_head", "model.n_heads")


@pytest.mark.parametrize(
    "key, value, type_name",
    [
        ("data.batch_size", "16", "int"),  # a string where an int goes
        ("data.batch_size", 16.0, "int"),
        ("data.batch_size", True, "int"),  # bool is an int subclass: still refused
        ("optim.lr", "3e-4", "float"),
        ("checkpoint.async_save", 1, "bool"),
        ("model.dim", "64", "int"),
        ("objective.name", 3, "str"),
    ],
)
def test_wrong_type_names_key_and_type(key, value, type_name):
    cfg = with_value(default_config(), key, value)
    assert_config_error(cfg, repr(key), type_name)


def test_value_where_a_section_goes():
    cfg = with_value(default_config(), "optim", 3)
    assert_config_error(cfg, "'optim'", "section")


def test_heads_not_divisible_by_kv_heads():
    cfg = default_config()
    cfg.model.n_heads, cfg.model.n_kv_heads = 6, 4
    assert_config_error(cfg, "model.n_heads", "model.n_kv_heads", "6", "4")


@pytest.mark.parametrize("value", [0, -8])
def test_non_positive_batch(value):
    cfg = default_config()
    cfg.data.batch_size = value
    assert_config_error(cfg, "data.batch_size", str(value))


@pytest.mark.parametrize("key", ["data.seq_len", "train.steps", "optim.grad_accum", "checkpoint.every_steps"])
def test_other_non_positive_counts(key):
    cfg = with_value(default_config(), key, 0)
    assert_config_error(cfg, key)


def test_batch_not_divisible_by_grad_accum():
    cfg = default_config()
    cfg.data.batch_size, cfg.optim.grad_accum = 16, 3
    assert_config_error(cfg, "data.batch_size", "optim.grad_accum", "16", "3")
    cfg.optim.grad_accum = 4
    validate(cfg)


def test_loss_chunks_must_divide_every_sequence_length():
    cfg = default_config()
    cfg.model.max_seq_len, cfg.data.seq_len, cfg.objective.loss_chunk_len = 4096, 1536, 1024
    assert_config_error(cfg, "data.seq_len", "objective.loss_chunk_len")
    cfg.data.seq_len, cfg.data.ramp = 2048, ((100_000, 32, 2560),)
    assert_config_error(cfg, "data.ramp[0]", "objective.loss_chunk_len")
    cfg.data.ramp = ((100_000, 32, 4096),)
    validate(cfg)
    cfg.data.seq_len, cfg.data.ramp = 512, ()  # shorter than a chunk: one chunk
    validate(cfg)


def test_seq_len_longer_than_model_context():
    cfg = default_config()
    cfg.data.seq_len = cfg.model.max_seq_len + 1
    assert_config_error(cfg, "data.seq_len", "model.max_seq_len")
    cfg.data.seq_len = cfg.model.max_seq_len
    validate(cfg)


def test_objective_not_in_list():
    cfg = default_config()
    cfg.objective.name = "ppo"
    assert_config_error(cfg, "objective.name", "'ppo'", "lm")


@pytest.mark.parametrize("objective", ["sft", "dpo", "reward"])
def test_post_training_objectives_need_the_weights_to_start_from(objective):
    cfg = default_config()
    cfg.objective.name = objective
    assert_config_error(cfg, "checkpoint.init_from")


def test_weights_to_start_from_that_do_not_exist_are_named(tmp_path):
    cfg = default_config()
    cfg.checkpoint.init_from = str(tmp_path / "nowhere")
    assert_config_error(cfg, "nowhere' does not exist", "configs/finetune.py:PATH")
    cfg.checkpoint.init_from = str(tmp_path)
    assert_config_error(cfg, "needs the tokenizer the checkpoint was trained with")


@pytest.mark.parametrize("changes, fragments", [
    (dict(tensor=16), ("mesh.tensor=16", "model.n_heads=8")),  # tensor > heads
    (dict(tensor=3), ("mesh.tensor=3", "divide")),
    (dict(stage=8), ("mesh.stage=8", "model.n_layers=4")),  # stages > layers
    (dict(stage=3), ("mesh.stage=3", "n_layers")),
    (dict(stage=2, schedule="circular", repeats=4), ("pipeline.repeats=4", "8 layer chunks")),
    (dict(stage=2, schedule="circular", microbatches=1), ("microbatches >= mesh.stage",)),
    (dict(stage=2, microbatches=3), ("pipeline microbatches", "data.batch_size")),
    (dict(context=3), ("2 x mesh.context = 6", "data.seq_len")),  # context must split seq_len in 2C chunks
    (dict(schedule="interleaved"), ("pipeline.schedule='interleaved'",)),
    (dict(stage=2, tensor=2, schedule="1f1b"), ("mesh.tensor > 1", "'gpipe'")),
])
def test_impossible_meshes_are_named(changes, fragments):
    cfg = default_config()  # the tiny model: 4 layers, 8 heads; batch 16 x 256
    for key, value in changes.items():
        (cfg.mesh if key in cfg.mesh else cfg.pipeline)[key] = value
    assert_config_error(cfg, *fragments)


def test_bad_model_choice_names_key():
    cfg = default_config()
    cfg.model.attention = "ring"
    assert_config_error(cfg, "model.attention", "'ring'")


def test_config_error_is_the_cli_error_type():
    assert issubclass(ConfigError, LlamaJaxError)


# ---------------------------------------------------------------------------------------------- the CLI


def run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The CLI on configs/tiny.py with its data cache inside tmp_path, so we can see that nothing was prepared."""
    cmd = [sys.executable, "-m", "llama_jax.train", "--config", str(REPO / "configs" / "tiny.py"),
           "--workdir", str(tmp_path / "run"), f"--config.data.cache_dir={tmp_path / 'cache'}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=dict(os.environ))


@pytest.fixture(scope="module")
def misspelled_override(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    tmp = tmp_path_factory.mktemp("typo")
    return run_cli(tmp, "--config.data.batchsize=3"), tmp


def test_cli_misspelled_override_is_one_readable_error(misspelled_override):
    result, tmp = misspelled_override
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert any(line.startswith("error:") and "batchsize" in line for line in result.stderr.splitlines())
    assert "batch_size" in result.stderr  # the suggestion
    assert not (tmp / "cache").exists(), "data was prepared before the config was checked"


@pytest.mark.parametrize("key", ["train.eval_every", "optim.warmup_steps", "optim.decay_steps",
                                 "objective.loss_chunk_len"])
def test_negative_counts_are_rejected(key):
    cfg = default_config()
    section, name = key.split(".")
    cfg[section][name] = -1
    with pytest.raises(ConfigError, match=key):
        validate(cfg)


def test_missing_key_is_named():
    cfg = default_config()
    del cfg.data["eval_batches"]
    with pytest.raises(ConfigError, match="data.eval_batches"):
        validate(cfg)


def test_cli_bad_head_count_exits_2_with_error_line(tmp_path):
    result = run_cli(tmp_path, "--config.model.n_kv_heads=3")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "model.n_heads" in errors[0] and "model.n_kv_heads" in errors[0]
    assert not (tmp_path / "cache").exists(), "data was prepared before the config was checked"


def test_an_empty_data_source_is_refused_rather_than_read_as_the_working_directory():
    cfg = default_config()
    for empty in ("", " "):
        cfg.data.source = empty
        assert_config_error(cfg, "data.source is empty", "for this one write '.'")
    cfg.data.mixture.code = mixture_source("stdlib", weight=1.0)
    validate(cfg)  # a mixture names its own sources


def test_mixture_entries_are_checked_by_name():
    cfg = default_config()
    cfg.data.mixture.code = mixture_source("stdlib", weight=0.4)
    cfg.data.mixture.docs = mixture_source("pydoc_topics", weight=0.6)
    validate(cfg)
    cfg.data.mixture.docs.weight = 0.0
    assert_config_error(cfg, "data.mixture.docs.weight", "positive")
    cfg.data.mixture.docs = mixture_source("", weight=1.0)
    assert_config_error(cfg, "data.mixture.docs.source", "empty")
    cfg.data.mixture.docs = mixture_source("pydoc_topics", weight=1.0)
    cfg.data.mixture.docs.wieght = 2.0
    assert_config_error(cfg, "data.mixture.docs.wieght", "did you mean data.mixture.docs.weight")
    cfg.data.mixture.bad = "pydoc_topics"
    assert_config_error(cfg, "data.mixture.bad", "mixture_source")


def test_evaluation_only_sources_are_checked_by_name():
    cfg = default_config()
    cfg.data.eval_sources.docs = eval_source("pydoc_topics")
    validate(cfg)
    cfg.data.eval_sources.docs = eval_source("")
    assert_config_error(cfg, "data.eval_sources.docs.source", "empty")
    cfg.data.eval_sources.docs = eval_source("pydoc_topics")
    cfg.data.eval_sources.docs.weight = 1.0
    assert_config_error(cfg, "unknown config key 'data.eval_sources.docs.weight'")
    del cfg.data.eval_sources.docs.weight
    cfg.data.eval_sources.bad = "pydoc_topics"
    assert_config_error(cfg, "data.eval_sources.bad", "eval_source(SOURCE)")
    del cfg.data.eval_sources.bad
    cfg.data.eval_sources.data = eval_source("stdlib_docstrings")
    assert_config_error(cfg, "data.eval_sources ['data'] has the name of a training source (['data'])", "rename it")
    del cfg.data.eval_sources.data
    cfg.data.mixture.docs = mixture_source("pydoc_topics", weight=1.0)
    assert_config_error(cfg, "data.eval_sources ['docs'] has the name of a training source (['docs'])")
    del cfg.data.mixture.docs


def test_the_ramp_is_checked_stage_by_stage():
    cfg = default_config()
    cfg.data.ramp = ((100_000, 32, 256), (200_000, 64, 512))
    validate(cfg)
    assert [(s.start_step, s.batch_size, s.seq_len) for s in batch_schedule(cfg).stages] == [
        (0, 16, 256), (25, 32, 256), (37, 64, 512)]
    cfg.data.ramp = ((100_000, 32, 256), (50_000, 64, 256))
    assert_config_error(cfg, "data.ramp[1]", "increasing order")
    cfg.data.ramp = ((100_000, 32),)
    assert_config_error(cfg, "data.ramp[0]", "three integers")
    cfg.data.ramp = ((100_000, 30, 256),)
    cfg.optim.grad_accum = 4
    assert_config_error(cfg, "data.ramp[0]", "optim.grad_accum")
    cfg.optim.grad_accum = 1
    cfg.data.ramp = ((100_000, 32, cfg.model.max_seq_len * 2),)
    assert_config_error(cfg, "data.ramp[0]", "model.max_seq_len")
    cfg.data.ramp = ()
    cfg.data.shuffle_window = 0
    assert_config_error(cfg, "data.shuffle_window")
    cfg.data.shuffle_window = 10**12  # a 7 TiB permutation, asked for inside a grain worker after compiling
    assert_config_error(cfg, "data.shuffle_window must be from 1 to 1,048,576 rows")
    cfg.data.shuffle_window = 4096
    cfg.data.ramp = (8192, 32, 256)  # one entry, without the tuple around it
    assert_config_error(cfg, "data.ramp[0] = 8192 is not an entry", "data.ramp=((8192, 32, 256),)")


def test_a_url_cache_dir_is_refused():
    """The tokenized cache is local files: gs://b/cache was read as the relative path gs:/b/cache."""
    cfg = default_config()
    cfg.data.cache_dir = "gs://bucket/cache"
    with pytest.raises(ConfigError, match=r"data.cache_dir='gs://bucket/cache' is a URL, .* give a local directory"):
        validate(cfg)


def run_command(tmp_path: Path, command: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"llama_jax.{command}", *args], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=dict(os.environ))


@pytest.mark.long
def test_cli_a_config_file_missing_or_broken_and_a_file_as_workdir_are_one_error_line(tmp_path):
    """Each was a traceback: ml_collections' deferred load error, the file's SyntaxError, os.makedirs'
    FileExistsError, and for a workdir or cache that cannot be written (read-only, or here under a file), the
    OSError from deep inside. The train and plan commands parse their flags alike (llama_jax/command_line.py)."""
    (tmp_path / "broken.py").write_text("def get_config():\n    return (\n")
    (tmp_path / "afile").write_text("")
    (tmp_path / "empty.py").write_text("LR = 1e-3\n")
    (tmp_path / "configs").mkdir()
    tiny = str(REPO / "configs" / "tiny.py")
    cases = [
        (command, message, args) for command in ("train", "plan") for message, args in (
            ("config file missing.py does not exist: pass one of configs/*.py", ["--config", "missing.py"]),
            ("config file missing.py does not exist", ["--config=missing.py:arg", "--config.train.steps=3"]),
            ("config file configs is a directory: pass one of configs/*.py", ["--config", "configs/"]),
            ("config file broken.py, line 2: '(' was never closed: fix the file", ["--config", "broken.py"]),
            ("config file empty.py has no get_config(): define one that returns the config (a ConfigDict), as "
             "configs/tiny.py does", ["--config", "empty.py"]),
            ("no --config given: pass one of configs/*.py", ["--config.train.steps=3"]),
            (f"config file {tiny}:arg: get_config() takes 0 positional arguments but 1 was given: pass FILE:ARG only "
             "when its get_config takes an argument", ["--config", f"{tiny}:arg"]),
            # overrides before the file are read (ml_collections refused them: "Found --config.train.steps=3 in argv
            # before a value for --config was specified")
            ("unknown config override --config.mesh.pipelin: mesh has no key 'pipelin'; its keys: context, data, "
             "fsdp, stage, tensor", ["--config.train.steps=3", "--config.mesh.pipelin=1", "--config", tiny]),
        )
    ] + [  # a stray argument: absl's usage text and exit 1 before, which the supervisor retried as a crash
         ("train", "unexpected arguments ['extra']: every setting is a flag", ["--config", tiny, "extra"]),
         ("train", f"the workdir {tmp_path / 'afile'} is a file: give a directory",
          ["--config", tiny, "--workdir", "afile", f"--config.data.cache_dir={tmp_path / 'cache'}"]),
         ("train", f"the workdir {tmp_path / 'afile' / 'run'} cannot be written (Not a directory): give a --workdir",
          ["--config", tiny, "--workdir", "afile/run", f"--config.data.cache_dir={tmp_path / 'cache'}"]),
         ("train", f"the cache directory {tmp_path / 'afile' / 'cache'} cannot be written (Not a directory: ",
          ["--config", tiny, "--workdir", "run", f"--config.data.cache_dir={tmp_path / 'afile' / 'cache'}"])]
    for command, message, args in cases:
        result = run_command(tmp_path, command, *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, result.stderr


@pytest.mark.parametrize("override, message", [
    ("--config.mesh.pipeline=2", "unknown config override --config.mesh.pipeline: mesh has no key 'pipeline'; its "
                                 "keys: context, data, fsdp, stage, tensor"),
    ("--config.optim.lrr=1", "unknown config override --config.optim.lrr: optim has no key 'lrr' (did you mean "
                             "optim.lr?); its keys: b1, b2, "),
    ("--config.trian.steps=3", "unknown config override --config.trian.steps: the config has no key 'trian' (did "
                               "you mean train?); its keys: checkpoint, data, "),
    ("--config.data.mixture.web.weight=1", "unknown config override --config.data.mixture.web.weight: data.mixture "
                                           "has no key 'web'; it is empty (add keys in the config file)"),
    ("--config.optim.lr.x=1", "unknown config override --config.optim.lr.x: optim.lr is a value, not a section"),
])
def test_unknown_override_names_its_whole_key_and_the_keys_beside_it(override, message):
    """ml_collections named only the key's last part ('pipeline'), with a suggestion on a second line when one was
    close; the keys beside it say what the section has (the pipeline axis is mesh.stage)."""
    with pytest.raises(ConfigError) as raised:
        command_line.load_config(str(REPO / "configs" / "tiny.py"), ["--config.train.steps=3", override])
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value), raised.value


@pytest.mark.parametrize("status, line", [
    ("RESOURCE_EXHAUSTED: Out of memory allocating 241325572228 bytes.",
     "error: the devices ran out of memory (RESOURCE_EXHAUSTED: Out of memory allocating 241325572228 bytes.): "
     "lower what a step holds at once: optim.grad_accum=N"),
    ("INTERNAL: something else", "jax.errors.JaxRuntimeError: INTERNAL: something else"),
])
def test_cli_running_out_of_device_memory_is_one_error_line(tmp_path, status, line):
    """An allocation the memory checks could not foresee fails inside XLA (as `JaxRuntimeError`, seen with a
    225 GiB step before the compiled step was checked). Other runtime errors keep their traceback."""
    (tmp_path / "oom.py").write_text(f"""import jax
from llama_jax import trainer
from llama_jax.config import default_config


def _fails(cfg, workdir):
    raise jax.errors.JaxRuntimeError({status!r})


trainer._train = _fails  # inside the run, where XLA raises it


def get_config():
    return default_config()
""")
    result = run_command(tmp_path, "train", "--config", "oom.py")
    assert result.stderr.strip().splitlines()[-1].startswith(line), result.stderr
    assert (result.returncode, "Traceback" in result.stderr) == ((2, False) if "RESOURCE" in status else (1, True))


@pytest.mark.parametrize("key, value, message", [
    ("optim.lr", -1e-3, "optim.lr must be zero or positive"),
    ("optim.weight_decay", -0.1, "optim.weight_decay must be zero or positive"),
    ("optim.grad_clip", -1.0, "optim.grad_clip must be zero or positive"),
    ("optim.b1", 1.0, r"optim.b1=1.0 must be in \[0, 1\)"),
    ("optim.b2", -0.5, r"optim.b2=-0.5 must be in \[0, 1\)"),
    ("optim.eps", 0.0, "optim.eps=0.0 must be positive: .* eps 0 makes those parameters NaN"),
    ("optim.schedule", "step", r"optim.schedule='step' is not one of \('cosine'"),
    ("optim.state_dtype", "float16", r"optim.state_dtype='float16' is not one of \('float32', 'bfloat16'\)"),
    ("optim.min_lr_ratio", 2.0, r"optim.min_lr_ratio=2.0 must be in \[0, 1\]"),
    ("optim.wsd_decay_fraction", 1.5, r"optim.wsd_decay_fraction=1.5 must be in \[0, 1\]"),
    ("checkpoint.max_to_keep", 0, "checkpoint.max_to_keep=0 must be at least 1"),
    ("model.rope_theta", 0.0, "model.rope_theta must be positive"),
    ("model.norm_eps", -1e-5, "model.norm_eps must be positive"),
    ("model.init_std", -0.02, "model.init_std must be zero or positive"),
    ("model.head_dim", -16, r"model.head_dim must be positive, or 0 for dim // n_heads; got -16"),  # was XLA's error
    ("watchdog.multiple", 0.5, r"watchdog.multiple=0.5 would call half of all ordinary steps hung"),
    ("train.profile_steps", -1, "train.profile_steps must be zero or positive"),
    ("train.profile_skip", -2, "train.profile_skip must be zero or positive"),
    ("seed", -1, "seed must be zero or positive"),
    # past every range check written as a comparison: NaN trained NaN; a seed past 32 bits failed in numpy
    ("optim.lr", float("nan"), "config key 'optim.lr' is nan: give a finite number"),
    ("optim.b2", float("inf"), "config key 'optim.b2' is inf: give a finite number"),
    ("seed", 10**20, r"seed=100000000000000000000 must be below 2\*\*32"),
])
def test_optimizer_checkpoint_and_model_values_out_of_range_are_named(key, value, message):
    """Each was accepted: a negative learning rate trains uphill, max_to_keep 0 keeps no checkpoint to resume from, a
    watchdog multiple below 1 stops a healthy run, Adam's eps 0 makes never-updated parameters NaN; a negative seed
    failed in numpy as the data started, an unknown optim.schedule or state_dtype only once the data was prepared."""
    cfg = default_config()
    *section, name = key.split(".")
    (cfg[section[0]] if section else cfg)[name] = value
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
