"""generation_config.json: which stop ids and sampling settings a checkpoint's files give, and from where."""

import json
import sysconfig
from pathlib import Path

import pytest
import transformers

from llama_jax.data.tokenizer import train_bpe
from llama_jax.errors import CheckpointError, ConfigError
from llama_jax.generation_config import GenerationSettings


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small tokenizer in Llama 3's tiktoken format, with the Llama 3 special tokens after its ranks."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    return train_bpe([text], 600, tmp_path_factory.mktemp("tok") / "tokenizer.model")


def write(directory: Path, name: str, content: dict) -> None:
    (directory / name).write_text(json.dumps(content))


def test_without_files_the_tokenizer_decides(tokenizer):
    settings = GenerationSettings.for_tokenizer(tokenizer)
    specials = tokenizer.special_tokens
    assert settings.stop_ids == (tokenizer.eos_id, specials["<|eom_id|>"], specials["<|eot_id|>"])
    assert (settings.bos_id, settings.pad_id) == (tokenizer.bos_id, tokenizer.pad_id)
    assert settings.sampling == {"temperature": 0.0, "top_p": 1.0, "top_k": 0}  # greedy
    assert "greedy (default)" in settings.describe() and "(tokenizer)" in settings.describe()


def test_generation_config_wins_over_config_json(tokenizer, tmp_path):
    write(tmp_path, "config.json", {"eos_token_id": 7, "bos_token_id": 3, "pad_token_id": 5})
    settings = GenerationSettings.from_directory(tmp_path, tokenizer)
    assert (settings.stop_ids, settings.bos_id, settings.pad_id) == ((7,), 3, 5)
    assert settings.origin["stop_ids"] == "config.json"

    instruct = {"bos_token_id": 3, "eos_token_id": [9, 8, 7], "do_sample": True, "temperature": 0.6, "top_p": 0.9,
                "max_length": 4096}
    write(tmp_path, "generation_config.json", instruct)
    settings = GenerationSettings.from_directory(tmp_path, tokenizer)
    assert settings.stop_ids == (9, 8, 7) and settings.origin["stop_ids"] == "generation_config.json"
    assert settings.pad_id == 5 and settings.origin["pad_id"] == "config.json"
    reference = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (settings.do_sample, settings.temperature, settings.top_p) == (
        reference.do_sample, reference.temperature, reference.top_p)
    assert list(settings.stop_ids) == reference.eos_token_id
    assert settings.sampling == {"temperature": 0.6, "top_p": 0.9, "top_k": 50}  # transformers' default top-k
    assert settings.origin["top_k"] == "default"
    assert settings.describe() == ("generation: sampling: temperature 0.6 (generation_config.json), top-k 50 "
                                   "(default), top-p 0.9 (generation_config.json); stop on ids [9, 8, 7] "
                                   "(generation_config.json)")


def test_command_line_overrides(tokenizer, tmp_path):
    write(tmp_path, "generation_config.json", {"eos_token_id": 9, "do_sample": True, "temperature": 0.6, "top_k": 20})
    settings = GenerationSettings.from_directory(tmp_path, tokenizer)
    greedy = settings.override(temperature=0.0, top_k=None, top_p=None)
    assert greedy.sampling == {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
    assert "greedy (command line)" in greedy.describe()
    hotter = settings.override(temperature=1.2, top_k=None, top_p=0.5)
    assert hotter.sampling == {"temperature": 1.2, "top_p": 0.5, "top_k": 20}
    assert hotter.origin["temperature"] == hotter.origin["top_p"] == "command line"
    assert hotter.origin["top_k"] == "generation_config.json"
    for bad, named in ((dict(temperature=-1.0), "--temperature -1.0"), (dict(top_k=-1), "--top_k -1"),
                       (dict(top_p=0.0), "--top_p 0.0"), (dict(temperature=0.0, top_p=2.0), "--top_p 2.0"),
                       (dict(temperature=-2.0, top_k=-3), "--temperature -2.0 and --top_k -3")):
        with pytest.raises(ConfigError, match=rf"^{named} out of range: need --temperature >= 0 \(0 = greedy\), "
                                              r"--top_k >= 0 and 0 < --top_p <= 1$"):
            settings.override(**{"temperature": None, "top_k": None, "top_p": None, **bad})


def test_top_k_and_top_p_on_greedy_settings_are_refused_not_ignored(tokenizer, tmp_path):
    """transformers stays greedy and warns; ours decoded greedily, saying so only in its settings line."""
    settings = GenerationSettings.for_tokenizer(tokenizer)
    with pytest.raises(ConfigError, match=r"^--top_k and --top_p apply to sampling, and these settings decode greedily "
                                          r"\(do_sample from default\): add --temperature above 0 to sample$"):
        settings.override(temperature=None, top_k=5, top_p=0.5)
    with pytest.raises(ConfigError, match=r"^--top_p applies to sampling, .*\(do_sample from command line\)"):
        settings.override(temperature=0.0, top_k=None, top_p=0.5)
    assert settings.override(temperature=0.7, top_k=5, top_p=None).sampling == {"temperature": 0.7, "top_p": 1.0,
                                                                                "top_k": 5}
    write(tmp_path, "generation_config.json", {"do_sample": True, "temperature": 0.6})
    sampled = GenerationSettings.from_directory(tmp_path, tokenizer).override(temperature=None, top_k=3, top_p=None)
    assert sampled.sampling["top_k"] == 3


def test_to_hf_round_trips_and_keeps_other_keys(tokenizer, tmp_path):
    write(tmp_path, "generation_config.json", {"eos_token_id": [9, 8], "bos_token_id": 1, "do_sample": True,
                                               "top_p": 0.8, "max_new_tokens": 99, "transformers_version": "4.0"})
    settings = GenerationSettings.from_directory(tmp_path, tokenizer)
    exported = settings.to_hf()
    assert exported["max_new_tokens"] == 99 and "transformers_version" not in exported
    out = tmp_path / "out"
    out.mkdir()
    write(out, "generation_config.json", exported)
    again = GenerationSettings.from_directory(out, tokenizer)
    assert (again.stop_ids, again.bos_id, again.pad_id, again.sampling) == (
        settings.stop_ids, settings.bos_id, settings.pad_id, settings.sampling)
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [9, 8]


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"eos_token_id": "</s>"}), "eos_token_id must be a token id or a list"),
    (json.dumps({"eos_token_id": []}), "eos_token_id must be a token id or a list"),
    (json.dumps({"do_sample": True, "top_p": 0}), "0 < top_p <= 1"),
    (json.dumps({"do_sample": True, "temperature": "0.6"}), r"^generation_config.json: temperature='0.6': do_sample "
     "must be true or false, temperature and top_p numbers and top_k a whole number; fix the file$"),
    (json.dumps({"do_sample": "true", "top_k": 2.5}), r": do_sample='true', top_k=2.5: do_sample must be"),
])
def test_bad_files_give_checkpoint_errors(tokenizer, tmp_path, content, message):
    (tmp_path / "generation_config.json").write_text(content)
    with pytest.raises(CheckpointError, match=message):
        GenerationSettings.from_directory(tmp_path, tokenizer)
