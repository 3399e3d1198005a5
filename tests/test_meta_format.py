"""Meta's original checkpoints: read against a transformers reference, written in Meta's layout, round trips exact.

The Meta files these tests read are built here from a transformers model, with Meta's names, its interleaved rotary
rows and its model-parallel split written out independently of llama_jax.meta_format."""

import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch
import transformers

from test_convert import add_tokenizer, convert_cli, hf_logits, hf_model, our_logits

from llama_jax import meta_format
from llama_jax.checkpoint import load_model
from llama_jax.convert import main
from llama_jax.errors import CheckpointError, ConfigError
from llama_jax.model import LlamaConfig

# Meta's use_scaled_rope constants; with theta 500000 and head_dim 16 several frequencies are scaled, so a misread
# flag changes the logits even at the tests' short sequences
META_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256, "multiple_of": 128,
          "ffn_dim_multiplier": 0.75, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}  # ffn 128
COLUMN_PARALLEL = ("tok_embeddings", "wq", "wk", "wv", "w1", "w3", "output")
ROW_PARALLEL = ("wo", "w2")


def reference(tie: bool = False) -> transformers.LlamaForCausalLM:
    return hf_model(tie=tie, rope=META_ROPE, head_dim=16)


def meta_state_dict(model: transformers.LlamaForCausalLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Meta's whole tensors for `model`: HF's renamed, with wq / wk rows back in interleaved rotary pairs (Meta's row
    2k + c of a head is HF's row c * head_dim / 2 + k)."""
    sd = {name: value.to(dtype) for name, value in model.state_dict().items()}
    h = model.config.head_dim
    order = [c * (h // 2) + k for k in range(h // 2) for c in range(2)]

    def interleaved(w: torch.Tensor) -> torch.Tensor:
        return w.reshape(-1, h, w.shape[1])[:, order].reshape(w.shape)

    whole = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
             "output.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])}
    for i in range(model.config.num_hidden_layers):
        hf, meta = f"model.layers.{i}.", f"layers.{i}."
        whole |= {
            meta + "attention.wq.weight": interleaved(sd[hf + "self_attn.q_proj.weight"]),
            meta + "attention.wk.weight": interleaved(sd[hf + "self_attn.k_proj.weight"]),
            meta + "attention.wv.weight": sd[hf + "self_attn.v_proj.weight"],
            meta + "attention.wo.weight": sd[hf + "self_attn.o_proj.weight"],
            meta + "feed_forward.w1.weight": sd[hf + "mlp.gate_proj.weight"],
            meta + "feed_forward.w2.weight": sd[hf + "mlp.down_proj.weight"],
            meta + "feed_forward.w3.weight": sd[hf + "mlp.up_proj.weight"],
            meta + "attention_norm.weight": sd[hf + "input_layernorm.weight"],
            meta + "ffn_norm.weight": sd[hf + "post_attention_layernorm.weight"],
        }
    return whole


def rank_slice(name: str, w: torch.Tensor, rank: int, ranks: int, n_kv_heads: int = 2) -> torch.Tensor:
    kind = name.split(".")[-2]
    if kind in ("wk", "wv") and ranks > n_kv_heads:  # each KV head on ranks / n_kv_heads consecutive ranks
        return w.chunk(n_kv_heads, dim=0)[rank // (ranks // n_kv_heads)]
    if kind in COLUMN_PARALLEL:
        return w.chunk(ranks, dim=0)[rank]
    return w.chunk(ranks, dim=1)[rank] if kind in ROW_PARALLEL else w


def write_meta_files(model, directory, ranks: int, dtype=torch.float32, views: bool = False) -> list[dict]:
    """Meta's directory for `model`: consolidated.NN.pth per rank, params.json, tokenizer.model. With `views`, the
    slices are saved as views of the whole tensors (strided, at offsets into a larger storage), not copies."""
    directory.mkdir(parents=True, exist_ok=True)
    whole = meta_state_dict(model, dtype)
    shards = []
    for rank in range(ranks):
        shard = {name: rank_slice(name, w, rank, ranks) for name, w in whole.items()}
        shard = shard if views else {name: w.clone() for name, w in shard.items()}
        torch.save(shard, directory / f"consolidated.{rank:02d}.pth")
        shards.append(shard)
    (directory / "params.json").write_text(json.dumps(PARAMS))
    add_tokenizer(directory)
    return shards


def read_meta_files(directory) -> list[dict]:
    return [torch.load(file, weights_only=True) for file in sorted(directory.glob("consolidated.*.pth"))]


def assert_same_shards(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for shard, reference_shard in zip(got, expected):
        assert shard.keys() == reference_shard.keys()
        for name, value in reference_shard.items():
            assert shard[name].dtype == value.dtype, name
            assert torch.equal(shard[name], value), name


@pytest.mark.parametrize("ranks,views", [(1, False), (2, False), (2, True), (4, False)],
                         ids=["1_rank", "2_ranks", "2_ranks_saved_as_views", "4_ranks_kv_repeated"])
def test_meta_checkpoint_gives_the_reference_logits(tmp_path, ranks, views):
    model = reference()
    write_meta_files(model, tmp_path / "meta", ranks, views=views)
    convert_cli("--from", "meta", "--to", "hf", tmp_path / "meta", tmp_path / "hf")
    converted = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    np.testing.assert_allclose(hf_logits(converted), hf_logits(model), rtol=0, atol=1e-4)
    convert_cli("--from", "meta", "--to", "ours", tmp_path / "meta", tmp_path / "ours")
    ours, _ = load_model(tmp_path / "ours")
    assert (ours.cfg.rope_type, ours.cfg.rope_factor, ours.cfg.rope_original_max_len) == ("llama3", 8.0, 8192)
    np.testing.assert_allclose(our_logits(ours), hf_logits(model), rtol=0, atol=1e-4)


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_written_meta_files_have_meta_layout(tmp_path, ranks):
    """Hugging Face -> Meta gives, tensor for tensor and bitwise, the files built here from Meta's layout."""
    model = reference()
    expected = write_meta_files(model, tmp_path / "expected", ranks)
    model.save_pretrained(tmp_path / "hf")
    add_tokenizer(tmp_path / "hf")
    convert_cli("--from", "hf", "--to", "meta", tmp_path / "hf", tmp_path / "meta", "--shards", ranks)
    assert_same_shards(read_meta_files(tmp_path / "meta"), expected)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert meta_format.ffn_dim(params["dim"], params["multiple_of"], params["ffn_dim_multiplier"]) == 128
    assert {k: v for k, v in params.items() if k not in ("multiple_of", "ffn_dim_multiplier")} == \
        {k: v for k, v in PARAMS.items() if k not in ("multiple_of", "ffn_dim_multiplier")}
    assert (tmp_path / "meta" / "tokenizer.model").read_bytes() == (tmp_path / "hf" / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_meta_to_ours_to_meta_is_exact(tmp_path, dtype, ranks):
    expected = write_meta_files(reference(), tmp_path / "meta", ranks, dtype)
    convert_cli("--from", "meta", "--to", "ours", tmp_path / "meta", tmp_path / "ours")
    convert_cli("--from", "ours", "--to", "meta", tmp_path / "ours", tmp_path / "back", "--shards", ranks)
    assert_same_shards(read_meta_files(tmp_path / "back"), expected)
    assert json.loads((tmp_path / "back" / "params.json").read_text()) == json.loads(
        (tmp_path / "meta" / "params.json").read_text()) | {"multiple_of": 128, "ffn_dim_multiplier": 0.75}


@pytest.mark.parametrize("output_weight", ["equal", "absent"])
def test_tied_embeddings_are_recognised_and_written_as_output(tmp_path, output_weight):
    model = reference(tie=True)
    write_meta_files(model, tmp_path / "meta", 2)
    if output_weight == "absent":
        for file in (tmp_path / "meta").glob("*.pth"):
            shard = torch.load(file, weights_only=True)
            del shard["output.weight"]
            torch.save(shard, file)
    convert_cli("--from", "meta", "--to", "ours", tmp_path / "meta", tmp_path / "ours")
    ours, _ = load_model(tmp_path / "ours")
    assert ours.cfg.tie_embeddings
    np.testing.assert_allclose(our_logits(ours), hf_logits(model), rtol=0, atol=1e-4)
    convert_cli("--from", "ours", "--to", "meta", tmp_path / "ours", tmp_path / "back", "--shards", 2)
    for shard in read_meta_files(tmp_path / "back"):
        assert torch.equal(shard["output.weight"], shard["tok_embeddings.weight"])


def test_untied_output_equal_to_nothing_else_is_kept(tmp_path):
    write_meta_files(reference(), tmp_path / "meta", 1)
    convert_cli("--from", "meta", "--to", "ours", tmp_path / "meta", tmp_path / "ours")
    assert not load_model(tmp_path / "ours")[0].cfg.tie_embeddings


PUBLISHED = {  # model: (dim, multiple_of, ffn_dim_multiplier, ffn_dim) from Meta's params.json and model cards
    "3-8B": (4096, 1024, 1.3, 14336), "3-70B": (8192, 4096, 1.3, 28672), "3.1-405B": (16384, 4096, 1.2, 53248),
    "3.2-1B": (2048, 256, 1.5, 8192), "3.2-3B": (3072, 256, 1.0, 8192), "tiny": (64, 128, 0.75, 128),
}


@pytest.mark.parametrize("model", PUBLISHED)
def test_ffn_width_from_params_json_and_back(model):
    dim, multiple_of, multiplier, ffn = PUBLISHED[model]
    assert meta_format.ffn_dim(dim, multiple_of, multiplier) == ffn
    params = meta_format.params_json(LlamaConfig(dim=dim, n_heads=4, n_kv_heads=4, ffn_dim=ffn))
    assert meta_format.ffn_dim(dim, params["multiple_of"], params["ffn_dim_multiplier"]) == ffn


def test_reading_needs_torch_and_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(CheckpointError, match="Meta checkpoints are torch files: pip install torch"):
        meta_format._torch()


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory):
    """A two-rank Meta directory, copied by each error test before it breaks it, and its conversion to ours."""
    root = tmp_path_factory.mktemp("meta")
    write_meta_files(reference(), root / "meta", 2)
    convert_cli("--from", "meta", "--to", "ours", root / "meta", root / "ours")
    return root


def edit_shard(file, name, value=None):
    """Replaces tensor `name` in a consolidated.NN.pth by `value`, or drops it."""
    shard = torch.load(file, weights_only=True)
    if value is None:
        del shard[name]
    else:
        shard[name] = value
    torch.save(shard, file)


READ_ERRORS = {
    "no_params_json": (lambda d: (d / "params.json").unlink(), "meta has no params.json: pass the directory holding"),
    "shard_missing": (lambda d: (d / "consolidated.00.pth").rename(d / "consolidated.02.pth"),
                      "meta lacks consolidated.00.pth of 3 model-parallel shards: download the missing files"),
    "shapes_disagree": (lambda d: edit_shard(d / "consolidated.01.pth", "layers.1.attention.wq.weight", torch.zeros(8, 64)),
                        r"consolidated.01.pth's layers.1.attention.wq.weight has shape \(8, 64\), but params.json and 2 "
                        r"shards imply \(32, 64\): the shards or params.json come from different checkpoints"),
    "replicas_disagree": (lambda d: edit_shard(d / "consolidated.01.pth", "norm.weight", torch.zeros(64)),
                          "consolidated.01.pth and consolidated.00.pth hold different copies of the same part of norm.weight"),
    "tensor_missing": (lambda d: edit_shard(d / "consolidated.00.pth", "layers.0.feed_forward.w1.weight"),
                       "consolidated.00.pth has no tensor 'layers.0.feed_forward.w1.weight'"),
    "params_incomplete": (lambda d: (d / "params.json").write_text(json.dumps({"dim": 64})),
                          "params.json lacks 'vocab_size'"),
}


@pytest.mark.parametrize("case", READ_ERRORS)
def test_broken_meta_checkpoints_fail_clearly(meta_dir, tmp_path, capsys, case):
    edit, expected = READ_ERRORS[case]
    broken = shutil.copytree(meta_dir / "meta", tmp_path / "meta")
    edit(broken)
    assert main(["--from", "meta", "--to", "hf", str(broken), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(expected, err), err


def test_meta_format_refuses_what_params_json_cannot_say(meta_dir, tmp_path, capsys):
    rope_32 = LlamaConfig(dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256, rope_factor=32.0)
    with pytest.raises(ConfigError, match=r"rope_factor=32.0.* is not what Meta's use_scaled_rope means"):
        meta_format.params_json(rope_32)
    with pytest.raises(ConfigError, match="Meta's params.json has no head_dim"):
        meta_format.params_json(rope_32.replace(rope_factor=8.0, head_dim=32))
    assert main(["--from", "ours", "--to", "meta", str(meta_dir / "ours"), str(tmp_path / "m"), "--shards", "3"]) == 2
    assert "--shards 3 cannot split this model (n_heads 4 is not divisible by it;" in capsys.readouterr().err
