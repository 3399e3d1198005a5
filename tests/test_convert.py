"""Hugging Face conversion: our files load in transformers, transformers' files load here, and bad ones fail clearly."""

import base64
import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hf_reference import random_hf_llama
from flax import nnx
from safetensors.numpy import load_file, save_file

from llama_jax.convert import load_hf, read_hf_config, save_hf
from llama_jax.errors import CheckpointError
from llama_jax.model import Llama, LlamaConfig, ModelDef

SEQ_LEN = 160  # beyond the original context of 64 below, so a misread RoPE scaling changes the logits
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
OURS = LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=128,
                   norm_eps=1e-5, rope_theta=10000.0, rope_type="llama3", rope_factor=8.0, rope_original_max_len=64,
                   max_seq_len=512, dtype="float32")


def hf_model(tie: bool = False, rope: dict = LLAMA3_ROPE, head_dim: int = 32,
             vocab_size: int = 256) -> transformers.LlamaForCausalLM:
    """A random tiny transformers Llama (GQA, by default head_dim 32 != 64 / 4) with non-trivial norm scales."""
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, rms_norm_eps=1e-5, max_position_embeddings=512,
        tie_word_embeddings=tie, rope_parameters=rope, initializer_range=0.1,
    )
    return random_hf_llama(cfg)


def our_model(cfg: LlamaConfig = OURS) -> Llama:
    """A model of ours with random weights, norm scales included (filled from numpy: a real init compiles on CPU)."""
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    for path, param in nnx.iter_graph(model):
        if isinstance(param, nnx.Param):
            is_norm = path[-1] == "scale"
            value = rng.uniform(0.5, 1.5, param.shape) if is_norm else rng.normal(0, 0.1, param.shape)
            param.set_value(jnp.asarray(value, jnp.float32))
    return model


TOKENS_BT = np.random.default_rng(1).integers(0, 256, (2, SEQ_LEN))


def hf_logits(model: transformers.LlamaForCausalLM) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS_BT)).logits.float().numpy()


def our_logits(model: Llama) -> np.ndarray:
    return np.asarray(model(jnp.asarray(TOKENS_BT, jnp.int32)))


def params(model: Llama) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))]


WEIGHTS_ONLY = pytest.mark.filterwarnings("ignore:save_hf wrote no tokenizer files")  # these tests check tensors


@WEIGHTS_ONLY
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_save_hf_loads_in_transformers_with_same_logits(tmp_path, tie):
    model = our_model(OURS.replace(tie_embeddings=tie))
    save_hf(model, tmp_path)
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert reference.config.tie_word_embeddings == tie
    np.testing.assert_allclose(hf_logits(reference), our_logits(model), rtol=0, atol=1e-4)


@WEIGHTS_ONLY
@pytest.mark.parametrize("dtype,max_shard_bytes", [("float32", 2**30), ("float32", 40_000), ("bfloat16", 40_000)])
def test_load_hf_inverts_save_hf_exactly(tmp_path, dtype, max_shard_bytes):
    model = our_model()
    save_hf(model, tmp_path, dtype=dtype, max_shard_bytes=max_shard_bytes)
    sharded = (tmp_path / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_bytes < 2**30) and sharded != (tmp_path / "model.safetensors").exists()
    loaded = load_hf(tmp_path, dtype=dtype)
    assert loaded.cfg == OURS.replace(dtype=dtype, param_dtype=dtype)
    for original, restored in zip(params(model), params(loaded), strict=True):
        assert restored.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(restored, original.astype(restored.dtype))


def _rewrite_config(path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def _as_4x_config(config: dict, rope_type_key: str = "rope_type") -> None:
    """Rewrites a 5.x config.json as transformers 4.x wrote it: rope_theta + rope_scaling, no rope_parameters."""
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    config["rope_scaling"] = None if rope_type == "default" else {rope_type_key: rope_type, **rope}


CASES = {
    "single_file_5x_config": dict(model=dict(), shard=None, edit=None),
    "sharded_4x_config": dict(model=dict(), shard="50KB", edit=_as_4x_config),
    "sharded_4x_legacy_type_key_tied": dict(model=dict(tie=True), shard="50KB",
                                            edit=lambda c: _as_4x_config(c, rope_type_key="type")),
    # old configs omit head_dim when it is dim / heads
    "single_file_4x_default_rope_no_head_dim": dict(
        model=dict(rope={"rope_type": "default", "rope_theta": 5000.0}, head_dim=16), shard=None,
        edit=lambda c: (_as_4x_config(c), c.pop("head_dim"))),
}


@pytest.mark.parametrize("case", CASES)
def test_load_hf_reads_transformers_checkpoints(tmp_path, case):
    spec = CASES[case]
    reference = hf_model(**spec["model"])
    reference.save_pretrained(tmp_path, **({"max_shard_size": spec["shard"]} if spec["shard"] else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(spec["shard"])
    if spec["edit"]:
        _rewrite_config(tmp_path, spec["edit"])
    loaded = load_hf(tmp_path)
    np.testing.assert_allclose(our_logits(loaded), hf_logits(reference), rtol=0, atol=1e-4)


def test_load_hf_reads_bfloat16_safetensors(tmp_path):
    hf_model().to(torch.bfloat16).save_pretrained(tmp_path)
    reference = hf_model()  # the same weights rounded to bf16, run in float32 (RoPE buffers stay float32)
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(param.bfloat16().float())
    loaded = load_hf(tmp_path)  # bf16 on disk, float32 parameters: an exact upcast
    assert loaded.embed[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(loaded.embed[...]), reference.model.embed_tokens.weight.detach().numpy())
    np.testing.assert_allclose(our_logits(loaded), hf_logits(reference), rtol=0, atol=1e-4)
    in_bf16 = load_hf(tmp_path, dtype="bfloat16", attention="reference")
    assert in_bf16.layers.attn.wq[...].dtype == jnp.bfloat16
    assert (in_bf16.cfg.dtype, in_bf16.cfg.param_dtype, in_bf16.cfg.attention) == ("bfloat16", "bfloat16", "reference")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A sharded transformers checkpoint, copied by each error test before it breaks it."""
    path = tmp_path_factory.mktemp("hf")
    hf_model().save_pretrained(path, max_shard_size="50KB")
    return path


@pytest.fixture
def broken(hf_dir, tmp_path):
    return shutil.copytree(hf_dir, tmp_path / "hf")


def test_load_hf_rejects_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf(tmp_path / "nowhere")


def test_load_hf_rejects_missing_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_hf(broken)


def test_load_hf_rejects_missing_safetensors(broken):
    for file in broken.glob("*.safetensors"):
        file.unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_hf(broken)


def test_load_hf_rejects_other_architectures(broken):
    _rewrite_config(broken, lambda c: c.update(architectures=["MistralForCausalLM"], model_type="mistral"))
    with pytest.raises(CheckpointError, match="unsupported architecture MistralForCausalLM: llama_jax reads "
                                              "LlamaForCausalLM checkpoints and LlamaForSequenceClassification reward"):
        load_hf(broken)
    _rewrite_config(broken, lambda c: c.update(architectures=["LlamaForSequenceClassification"], model_type="llama",
                                               id2label={"0": "bad", "1": "good"}))
    with pytest.raises(CheckpointError, match="has 2 labels: llama_jax reads one-label classifiers, reward models"):
        load_hf(broken)


def test_load_hf_rejects_unsupported_rope_type(broken):
    _rewrite_config(broken, lambda c: c["rope_parameters"].update(rope_type="yarn"))
    with pytest.raises(CheckpointError, match="unsupported rope_type 'yarn'"):
        load_hf(broken)


def test_a_download_cut_short_is_named_by_loading_and_by_conversion(broken, tmp_path, capsys):
    """Before, loading raised safetensors' SafetensorError and conversion a numpy reshape error, both as tracebacks."""
    from llama_jax.convert import main

    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{shard} is damaged or incomplete .*: re-download it"):
        load_hf(broken)
    assert main(["--from", "hf", "--to", "ours", str(broken), str(tmp_path / "ours")]) == 2
    assert re.fullmatch(f"error: {shard} is incomplete: its header describes [0-9,]+ bytes, the file has [0-9,]+: "
                        "re-download it\n", capsys.readouterr().err)


def test_a_file_that_is_not_safetensors_is_named_by_conversion_and_averaging(broken, tmp_path, capsys):
    """A git clone without git-lfs leaves pointer files: their first 8 bytes, read as the header's length, asked for
    exabytes, and conversion and averaging ended in a MemoryError traceback."""
    from llama_jax import average
    from llama_jax.convert import main

    shard = sorted(broken.glob("*.safetensors"))[0]
    shard.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 51200\n")
    with pytest.raises(CheckpointError, match=f"{shard} is damaged or incomplete .*: re-download it"):
        load_hf(broken)
    expected = (rf"error: {shard} is not a safetensors file: its first 8 bytes give a header of [0-9,]+ bytes, the file "
                r"has 70 \(a git-lfs pointer, or a web page saved in its place\): re-download it\n")
    assert main(["--from", "hf", "--to", "ours", str(broken), str(tmp_path / "ours")]) == 2
    assert re.fullmatch(expected, capsys.readouterr().err)
    assert average.main(["--out", str(tmp_path / "avg"), str(broken), str(broken)]) == 2
    assert re.fullmatch(expected, capsys.readouterr().err)


def test_quantized_weights_are_refused_not_read_as_floats(broken):
    """A bitsandbytes or FP8 release: int8 weights were cast to floats as they were (a model that runs and is
    garbage), FP8 ones ended in a traceback."""
    quantized = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    _rewrite_config(broken, lambda c: c.update(quantization_config=quantized))
    with pytest.raises(CheckpointError, match=r"config.json has a quantization_config \(bitsandbytes\): its weights are "
                                              "stored quantized, which llama_jax does not read; use the model's "):
        load_hf(broken)
    _rewrite_config(broken, lambda c: c.pop("quantization_config"))
    name = "model.layers.1.self_attn.k_proj.weight"
    shard = broken / json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = np.round(tensors[name] * 100).astype(np.int8)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{broken} stores {name} as I8, quantized: llama_jax reads float32"):
        load_hf(broken)


@pytest.mark.parametrize("side_file", ["generation_config.json", "tokenizer_config.json"])
def test_a_damaged_side_file_stops_conversion_before_any_weight_is_written(broken, tmp_path, capsys, side_file):
    """Before, conversion to ours copied it as it was, and the converted run failed only where it was used."""
    from llama_jax.convert import main

    add_tokenizer(broken)
    (broken / side_file).write_text("{cut off")
    assert main(["--from", "hf", "--to", "ours", str(broken), str(tmp_path / "ours")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {broken / side_file} is not valid JSON (")
    assert not (tmp_path / "ours").exists()


def test_load_hf_names_a_missing_tensor(broken):
    name = "model.layers.1.self_attn.k_proj.weight"
    shard = broken / json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"no tensor '{name}'"):
        load_hf(broken)


def test_load_hf_names_a_tensor_of_the_wrong_shape(broken):
    _rewrite_config(broken, lambda c: c.update(intermediate_size=96))
    expected = r"'model.layers.0.mlp.gate_proj.weight' .* has shape \(128, 64\), but config.json implies \(96, 64\)"
    with pytest.raises(CheckpointError, match=expected):
        load_hf(broken)


def test_save_hf_without_a_tokenizer_warns_that_the_directory_is_incomplete(tmp_path):
    with pytest.warns(UserWarning, match="save_hf wrote no tokenizer files"):
        save_hf(our_model(), tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
          " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    """Shaped like a SmolLM2 repository: no bos added, bos_token a chat token, a ChatML template, three stop ids."""
    import sysconfig

    import tokenizers

    path = tmp_path_factory.mktemp("smol")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator([(stdlib / "textwrap.py").read_text()], tokenizers.trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML,
        "tokenizer_class": "GPT2Tokenizer"}))
    cfg = transformers.LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    random_hf_llama(cfg).save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0, 5],
                                                             "do_sample": True, "temperature": 0.2, "top_p": 0.9}))
    return path


def test_convert_cli_re_exports_a_hugging_face_directory_whole(smol_dir, tmp_path, capsys):
    from llama_jax.convert import main, open_checkpoint

    out = tmp_path / "out"
    assert main(["--from", "hf", "--to", "hf", str(smol_dir), str(out), "--dtype", "bfloat16"]) == 0
    assert "wrote" in capsys.readouterr().out
    source_tok, out_tok = (transformers.AutoTokenizer.from_pretrained(d) for d in (smol_dir, out))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    for text in ["def f(x):\n    return x", "naïve café"]:
        assert out_tok(text).input_ids == source_tok(text).input_ids
    assert (out_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
            == source_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    reference = transformers.GenerationConfig.from_pretrained(out)
    assert (reference.eos_token_id, reference.do_sample, reference.temperature, reference.top_p) == ([2, 0, 5], True, 0.2, 0.9)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    again = open_checkpoint(out)
    assert again.tokenizer.prefix_ids == () and again.generation.stop_ids == (2, 0, 5)
    assert again.chat_template == CHATML
    original = open_checkpoint(smol_dir)
    for a, b in zip(params(original.model), params(again.model)):
        np.testing.assert_array_equal(a.astype(jnp.bfloat16).astype(np.float32), b)  # rounded once to bf16, no more


def add_tokenizer(directory: Path) -> Path:
    """A tiktoken tokenizer.model whose ranks are the 256 bytes: the kind of file Meta's releases and our runs carry."""
    path = directory / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return path


def convert_cli(*args) -> None:
    from llama_jax.convert import main

    assert main([str(arg) for arg in args]) == 0


def safetensors_of(directory: Path) -> dict[str, np.ndarray]:
    return {name: value for file in sorted(directory.glob("*.safetensors")) for name, value in load_file(file).items()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hugging_face_to_ours_to_hugging_face_is_exact(tmp_path, dtype):
    from llama_jax.checkpoint import load_model

    hf_model().to(getattr(torch, dtype)).save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    add_tokenizer(tmp_path / "hf")
    convert_cli("--from", "hf", "--to", "ours", tmp_path / "hf", tmp_path / "ours")
    convert_cli("--from", "ours", "--to", "hf", tmp_path / "ours", tmp_path / "back")
    original, back = safetensors_of(tmp_path / "hf"), safetensors_of(tmp_path / "back")
    assert original.keys() == back.keys() and len(original) == 21
    for name, value in original.items():
        assert back[name].dtype == value.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    assert read_hf_config(tmp_path / "back") == read_hf_config(tmp_path / "hf")
    model, tokenizer = load_model(tmp_path / "ours")
    assert model.embed[...].dtype == jnp.dtype(dtype) and tokenizer == str(tmp_path / "ours" / "tokenizer.model")
    assert {p.name for p in (tmp_path / "back").iterdir()} >= {"tokenizer.json", "tokenizer_config.json",
                                                                "generation_config.json", "config.json"}


def test_token_ids_stated_in_config_json_alone_survive_conversion_both_ways(tmp_path):
    """Without generation_config.json transformers stops on config.json's eos ids. A conversion to ours kept no
    config.json, so the converted model stopped on the tokenizer's eos; and config.json exports stated no ids, so
    transformers' `model.config` read its defaults (bos 1, eos 2)."""
    from llama_jax.convert import open_checkpoint

    hf_model().save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").unlink()
    _rewrite_config(tmp_path / "hf", lambda c: c.update(bos_token_id=0, eos_token_id=[1, 7]))
    add_tokenizer(tmp_path / "hf")
    convert_cli("--from", "hf", "--to", "ours", tmp_path / "hf", tmp_path / "ours")
    convert_cli("--from", "ours", "--to", "hf", tmp_path / "ours", tmp_path / "back")
    for directory in ("hf", "ours", "back"):
        settings = open_checkpoint(tmp_path / directory).generation
        assert (settings.bos_id, settings.stop_ids) == (0, (1, 7)), directory
    back = transformers.AutoConfig.from_pretrained(tmp_path / "back")
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (0, [1, 7], None)


def test_ours_exported_to_hugging_face_gives_our_logits_in_transformers(tmp_path):
    from llama_jax.checkpoint import load_model

    hf_model(tie=True).save_pretrained(tmp_path / "hf")
    add_tokenizer(tmp_path / "hf")
    convert_cli("--from", "hf", "--to", "ours", tmp_path / "hf", tmp_path / "ours")
    convert_cli("--from", "ours", "--to", "hf", tmp_path / "ours", tmp_path / "out")
    ours, _ = load_model(tmp_path / "ours")
    assert ours.cfg.tie_embeddings
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(hf_logits(reference), our_logits(ours), rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def cli_dirs(tmp_path_factory):
    """An HF directory without a tokenizer, one with, and a converted run. Its vocabulary holds the tokenizer's 256
    bytes and its special tokens (ids 256 on), which a prompt begins with: `generate` refuses ids past the model's."""
    root = tmp_path_factory.mktemp("cli")
    hf_model(vocab_size=512).save_pretrained(root / "bare")
    shutil.copytree(root / "bare", root / "hf")
    add_tokenizer(root / "hf")
    convert_cli("--from", "hf", "--to", "ours", root / "hf", root / "ours")
    (root / "empty").mkdir()
    return root


def test_a_converted_checkpoint_generates_and_starts_a_run(cli_dirs, capsys):
    from llama_jax import checkpoint, generate

    assert generate.main(["--checkpoint", str(cli_dirs / "ours"), "--prompt", "def", "--max_new_tokens", "4"]) == 0
    capsys.readouterr()
    cfg = read_hf_config(cli_dirs / "hf")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = nnx.to_pure_dict(ModelDef(cfg).abstract_state)
    started = checkpoint.load_pretrained(cli_dirs / "ours", cfg, jax.tree.map(lambda _: device, abstract))
    expected = nnx.to_pure_dict(nnx.state(load_hf(cli_dirs / "hf"), nnx.Param))
    for got, want in zip(jax.tree.leaves(started), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


CLI_ERRORS = {
    "missing_source": (["--from", "hf", "--to", "ours", "{root}/nowhere", "{out}"], "checkpoint .*nowhere does not exist"),
    "ours_is_hf": (["--from", "ours", "--to", "hf", "{root}/hf", "{out}"],
                   r"hf is a Hugging Face directory \(config.json\), not a llama_jax workdir .*: pass --from hf"),
    "hf_is_ours": (["--from", "hf", "--to", "meta", "{root}/ours", "{out}"], "ours is a llama_jax workdir .*: pass --from ours"),
    "hf_without_config": (["--from", "hf", "--to", "ours", "{root}/empty", "{out}"], "empty has no config.json"),
    "ours_without_steps": (["--from", "ours", "--to", "hf", "{root}/empty", "{out}"], "no checkpoint found at .*empty"),
    "shards_for_hf": (["--from", "ours", "--to", "hf", "{root}/ours", "{out}", "--shards", "2"],
                      "--shards 2 applies only to --to meta"),
    "same_directory": (["--from", "hf", "--to", "hf", "{root}/hf", "{root}/hf"], "holds the checkpoint being read"),
    "ours_needs_a_tokenizer": (["--from", "hf", "--to", "ours", "{root}/bare", "{out}"],
                               "bare has no tokenizer .*: copy the model's tokenizer into it, or convert to hf"),
    "ours_into_a_run": (["--from", "hf", "--to", "ours", "{root}/hf", "{root}/ours"],
                        r"ours already holds checkpoints \(steps 0\): write to a new directory"),
}


@pytest.mark.parametrize("case", CLI_ERRORS)
def test_convert_cli_errors_name_the_problem_and_the_fix(cli_dirs, tmp_path, capsys, case):
    from llama_jax.convert import main

    args, expected = CLI_ERRORS[case]
    assert main([arg.format(root=cli_dirs, out=tmp_path / "out") for arg in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(expected, err), err
