"""A run whose workdir is a gs:// bucket: checkpoints, logs, resume and the workdir lease, against a local stand-in.

The stand-in is `gcp-storage-emulator`, an in-memory server speaking the Cloud Storage JSON API. Every client the run
uses is pointed at it: Orbax's TensorStore (TENSORSTORE_GCS_HTTP_URL) and etils.epath through gcsfs
(STORAGE_EMULATOR_HOST), which carries the logs, TensorBoard's events and the lease. So the same code paths as on a
real bucket run here. One local and one bucket run, trained alike, are shared by the tests: what a bucket path gives
(conversion, averaging, generation) must equal what the same operation gives on the local run.
"""

import json
import os
import socket
import subprocess
import time
import uuid
from http import HTTPStatus
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath
from flax import nnx

from cli_run import cache_dir, read_metrics  # noqa: F401 (a fixture)
from test_train import small_config

from llama_jax import average, checkpoint, convert, generate, rewind, trainer
from llama_jax import workdir as workdir_lib
from llama_jax.convert import open_checkpoint, open_source, param_shapes
from llama_jax.data import stdlib_chat
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.errors import CheckpointError, DataError
from llama_jax.generate import parse_mesh
from llama_jax.parallel.mesh import make_mesh
from llama_jax.rejection_sample import read_prompts

BUCKET = "runs"


def _with_generation_header(download):
    """The emulator's download, answering with the object's generation in `x-goog-generation` as Cloud Storage does
    (TensorStore reads it to make its conditional writes; without it, OCDBT's manifest updates fail now and then)."""

    def answer(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status in (200, 206):
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]

    return answer


# A bucket whose objects this account may read but not write, answered as Cloud Storage answers.
READ_ONLY = "read-only"
REFUSAL = ("runner@project.iam.gserviceaccount.com does not have storage.objects.create access to the Google Cloud "
           "Storage object. Permission 'storage.objects.create' denied on resource (or it may not exist).")


def _refusing_read_only_writes(handler):
    def answer(request, response, storage, *args, **kwargs):
        if request.params.get("bucket_name") != READ_ONLY:
            return handler(request, response, storage, *args, **kwargs)
        response.status = HTTPStatus.FORBIDDEN
        response.json({"error": {"code": 403, "message": REFUSAL, "errors": [{"reason": "forbidden"}]}})

    return answer


@pytest.fixture(scope="session")
def emulator():
    """The stand-in's URL. One per test process: its clients (gcsfs through epath, TensorStore) are made once per
    process and keep the endpoint they were made with."""
    from gcp_storage_emulator import server as emulator_server
    from gcp_storage_emulator.handlers import objects
    from gcp_storage_emulator.server import create_server

    writes = (objects.insert, objects.upload_partial, objects.copy, objects.rewrite, objects.compose, objects.delete,
              objects.patch)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(objects, "download", _with_generation_header(objects.download))
        for _, handlers in emulator_server.HANDLERS:
            for method, handler in list(handlers.items()):
                if handler in writes:
                    patch.setitem(handlers, method, _refusing_read_only_writes(handler))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
        server.start()
        url = f"http://127.0.0.1:{port}"
        for key, value in dict(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                               GOOGLE_AUTH_TOKEN_FOR_TESTING="test").items():
            patch.setenv(key, value)
        yield url
        server.stop()


@pytest.fixture(scope="module")
def bucket(emulator):
    """A directory of the stand-in's bucket new to each setup of this module's fixtures: pytest-xdist may set them
    up twice in one process (when its tests are split between workers), and the second setup must find nothing of the
    first, not even in gcsfs's cached listings."""
    return f"gs://{BUCKET}/{uuid.uuid4().hex[:8]}"


def read_remote_metrics(workdir: str) -> list[dict]:
    return workdir_lib.read_jsonl(epath.Path(workdir) / "metrics.jsonl")


@pytest.fixture(scope="module")
def runs(bucket, tmp_path_factory, cache_dir):
    """(local workdir, bucket workdir, the bucket's steps after its first part): 6 steps straight, and 3 then 6
    resumed in the bucket; both keep checkpoints 3 and 6. The resumed part is profiled from its second step (5) on,
    for more steps than it has left, which must change nothing in its training."""
    local = tmp_path_factory.mktemp("runs") / "local"
    trainer.train(small_config(cache_dir, 6), local)
    remote = f"{bucket}/resumed"
    trainer.train(small_config(cache_dir, 3), remote)
    first_part = sorted(p.name for p in (epath.Path(remote) / "checkpoints").iterdir())
    profiled = small_config(cache_dir, 6)
    profiled.train.profile_skip, profiled.train.profile_steps = 1, 10
    trainer.train(profiled, remote)
    return local, remote, first_part


def test_a_run_in_a_bucket_saves_resumes_and_loads_as_a_local_one(runs):
    local, remote, first_part = runs
    assert first_part == ["3"]
    expected = [m["loss"] for m in read_metrics(local)]
    assert [m["step"] for m in read_remote_metrics(remote)] == list(range(1, 7)), "every step logged once"
    assert [m["loss"] for m in read_remote_metrics(remote)] == expected
    assert any((epath.Path(remote) / "tensorboard").iterdir())
    model_a, _ = checkpoint.load_model(local)
    model_b, tokenizer = checkpoint.load_model(remote)
    assert tokenizer.startswith(remote)
    for a, b in zip(jax.tree.leaves(nnx.state(model_a)), jax.tree.leaves(nnx.state(model_b))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_profile_of_a_bucket_run_is_written_to_the_bucket(runs):
    """The trace is written locally and copied up when the run ends inside it."""
    _, remote, _ = runs
    session, = (epath.Path(remote) / "profile" / "plugins" / "profile").iterdir()
    names = {p.name for p in session.iterdir()}
    assert {f"{socket.gethostname()}.xplane.pb", "perfetto_trace.json.gz"} <= names, names
    assert (session / f"{socket.gethostname()}.xplane.pb").stat().length > 10_000


def test_a_held_bucket_workdir_refuses_a_second_run_until_its_lease_expires(bucket, cache_dir):
    workdir = workdir_lib.resolve(f"{bucket}/leased")
    holder = workdir_lib.lock(workdir)
    with pytest.raises(CheckpointError, match=r"is in use by a running job \(pid \d+ on .*\): .*another --workdir"):
        trainer.train(small_config(cache_dir, 2), workdir)
    assert not (workdir / "checkpoints").exists(), "the refused run wrote nothing"
    holder.release()
    assert not (workdir / ".lock").exists()

    stale = {"id": "crashed", "holder": "pid 1 on gone", "time": time.time() - workdir_lib.LEASE_EXPIRY_S - 1}
    (workdir / ".lock").write_text(json.dumps(stale))  # a run that died without releasing its lease
    trainer.train(small_config(cache_dir, 2), workdir)
    assert (workdir / "checkpoints" / "2").is_dir()


def test_a_fresh_lease_of_a_process_of_this_machine_that_died_is_taken_over(bucket):
    """A run killed (SIGKILL, out of memory, the watchdog's exit) never releases its lease; its supervisor restarts it
    on the same machine within the lease's 120 s, and the restart was refused as "in use", so the supervisor gave up.
    A live holder, or one of another machine, still holds the workdir."""
    workdir = workdir_lib.resolve(f"{bucket}/killed")
    finished = subprocess.Popen(["true"])
    finished.wait()

    def held_by(pid: int, machine: str | None) -> None:
        lease = {"id": "old", "holder": f"pid {pid} on here", "pid": pid, "machine": machine, "time": time.time()}
        (workdir / ".lock").write_text(json.dumps(lease))

    held_by(finished.pid, workdir_lib._machine_id())
    workdir_lib.lock(workdir).release()
    for pid, machine in ((os.getpid(), workdir_lib._machine_id()), (finished.pid, "another machine's boot id")):
        held_by(pid, machine)
        with pytest.raises(CheckpointError, match=rf"is in use by a running job \(pid {pid} on here\)"):
            workdir_lib.lock(workdir)


def remote_files(directory: str) -> dict[str, bytes]:
    """{name: content} of the files directly in a bucket directory."""
    return {p.name: p.read_bytes() for p in epath.Path(directory).iterdir() if p.is_file()}


def local_files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def assert_same_params(a, b) -> None:
    """Every parameter of two checkpoints (any format `convert` reads) bitwise equal, in the same dtype."""
    a, b = open_source(a), open_source(b)
    assert param_shapes(a.cfg) == param_shapes(b.cfg)
    for path in param_shapes(a.cfg):
        x, y = a.read(path), b.read(path)
        assert x.dtype == y.dtype and np.array_equal(x, y), path


@pytest.fixture(scope="module")
def exported(runs, bucket, tmp_path_factory):
    """Each run converted to Hugging Face by the CLI, the bucket run into the bucket: (local dir, bucket dir)."""
    local, remote, _ = runs
    local_hf, remote_hf = tmp_path_factory.mktemp("exported") / "hf", f"{bucket}/exported/hf"
    assert convert.main(["--from", "ours", "--to", "hf", str(local), str(local_hf)]) == 0
    assert convert.main(["--from", "ours", "--to", "hf", remote, remote_hf]) == 0
    return local_hf, remote_hf


def test_conversion_from_and_to_a_bucket_writes_what_it_writes_locally(runs, exported, bucket, tmp_path):
    local_hf, remote_hf = exported
    expected = local_files(local_hf)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(expected)
    assert remote_files(remote_hf) == expected, "the same files, byte for byte"

    assert convert.main(["--from", "hf", "--to", "ours", str(local_hf), str(tmp_path / "ours")]) == 0
    assert convert.main(["--from", "hf", "--to", "ours", remote_hf, f"{bucket}/exported/ours"]) == 0
    assert_same_params(tmp_path / "ours", f"{bucket}/exported/ours")
    assert_same_params(f"{bucket}/exported/ours", runs[1])  # the round trip through the bucket loses nothing
    assert remote_files(f"{bucket}/exported/ours") == local_files(tmp_path / "ours")  # the tokenizer files
    meta = epath.Path(bucket) / "exported" / "ours" / "checkpoints" / "0" / "meta" / "metadata"
    assert json.loads(meta.read_text()) == json.loads((tmp_path / "ours/checkpoints/0/meta/metadata").read_text())

    # Meta's layout, written at offsets, goes through a local directory; it is read back with ranged reads
    assert convert.main(["--from", "hf", "--to", "meta", "--shards", "2", str(local_hf), str(tmp_path / "meta")]) == 0
    assert convert.main(["--from", "hf", "--to", "meta", "--shards", "2", remote_hf, f"{bucket}/exported/meta"]) == 0
    assert remote_files(f"{bucket}/exported/meta") == local_files(tmp_path / "meta")
    assert_same_params(f"{bucket}/exported/meta", tmp_path / "meta")


def test_a_missing_bucket_path_is_named_with_the_fix(bucket, capsys):
    missing = f"{bucket}/no/such/run"
    assert convert.main(["--from", "ours", "--to", "hf", missing, f"{bucket}/out"]) == 2
    assert f"error: checkpoint {missing} does not exist (for a bucket, check the path with gsutil ls)" in \
        capsys.readouterr().err
    assert average.main([missing, "--out", f"{bucket}/avg"]) == 2
    assert f"checkpoint {missing} does not exist" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=f"checkpoint {missing} does not exist.*gsutil ls"):
        open_checkpoint(missing)
    assert not epath.Path(f"{bucket}/out").exists() and not epath.Path(f"{bucket}/avg").exists()


def test_an_output_in_a_missing_bucket_is_refused_before_any_work(bucket, tmp_path, capsys):
    """Before, a command found out when it came to write: after the conversion or the sampling. Now one empty object
    is written and deleted where the output goes, first."""
    workdir_lib.check_writable(f"{bucket}/fine", "--out", directory=True)
    workdir_lib.check_writable(f"{bucket}/fine/p.jsonl", "--out", directory=False)
    assert not epath.Path(f"{bucket}/fine").exists(), "the check leaves nothing behind"
    missing = "gs://no-such-bucket-here"
    assert stdlib_chat.main(["prompts", "--out", f"{missing}/p.jsonl"]) == 2
    assert capsys.readouterr().err == (f"error: --out {missing}/p.jsonl cannot be written (there is no bucket {missing}): "
                                       "give a bucket path this account may write to, or a local path\n")
    assert convert.main(["--from", "ours", "--to", "hf", str(tmp_path / "never-read"), f"{missing}/hf"]) == 2
    assert f"error: the output directory {missing}/hf cannot be written (there is no bucket {missing})" in \
        capsys.readouterr().err


def test_a_bucket_this_account_may_not_write_is_refused_with_the_store_s_reason(emulator, cache_dir, capsys):
    """gcsfs puts the request's URL where the reason should be (`Forbidden: http://...?name=run%2F.lock`, the reason
    on the line below): the messages give the reason."""
    epath.Path(f"gs://{READ_ONLY}").mkdir()  # makes the bucket
    workdir = f"gs://{READ_ONLY}/run"
    with pytest.raises(CheckpointError) as refused:
        trainer.train(small_config(cache_dir, 2), workdir)
    assert str(refused.value) == (f"the workdir {workdir} cannot be written (Forbidden: {REFUSAL}): give a --workdir "
                                  "where this user can write")
    assert stdlib_chat.main(["prompts", "--out", f"{workdir}/p.jsonl"]) == 2
    assert capsys.readouterr().err == (
        f"error: --out {workdir}/p.jsonl cannot be written (writing a test object there failed: OSError: Forbidden: "
        f"{REFUSAL}): give a bucket path this account may write to, or a local path\n")


def test_rejection_sampling_prompts_written_to_a_bucket_read_back_as_local_ones(bucket, tmp_path, capsys):
    for out in (f"{bucket}/prompts/p.jsonl", str(tmp_path / "p.jsonl")):
        assert stdlib_chat.main(["prompts", "--out", out, "--limit", "3"]) == 0
    assert f"wrote 3 prompts to {bucket}/prompts/p.jsonl" in capsys.readouterr().out
    assert read_prompts(f"{bucket}/prompts/p.jsonl") == read_prompts(tmp_path / "p.jsonl")
    assert len(read_prompts(tmp_path / "p.jsonl")) == 3


def test_averaging_bucket_checkpoints_into_a_bucket_equals_averaging_local_ones(runs, bucket, tmp_path):
    local, remote, _ = runs
    steps = ("checkpoints/3", "checkpoints/6")
    assert average.main([*(str(local / step) for step in steps), "--out", str(tmp_path / "avg")]) == 0
    assert average.main([*(f"{remote}/{step}" for step in steps), "--out", f"{bucket}/avg"]) == 0
    assert_same_params(f"{bucket}/avg", tmp_path / "avg")
    a, b = (open_source(f"{remote}/{step}").read(("embed",)) for step in steps)
    assert np.array_equal(open_source(f"{bucket}/avg").read(("embed",)), ((a.astype(np.float64) + b) / 2).astype(a.dtype))


def assert_same_opened(a, b) -> None:
    for x, y in zip(jax.tree.leaves(nnx.state(a.model)), jax.tree.leaves(nnx.state(b.model)), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert a.generation == b.generation and a.chat_template == b.chat_template
    assert a.tokenizer.encode("def main(x):", allow_special=True) == b.tokenizer.encode("def main(x):", allow_special=True)


def test_opening_and_generating_from_a_bucket_equals_doing_it_locally(runs, exported, capsys):
    local, remote, _ = runs
    local_hf, remote_hf = exported
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    (local_hf / "chat_template.jinja").write_text(template)  # read from a bucket only through the local copy
    (epath.Path(remote_hf) / "chat_template.jinja").write_text(template)
    for local_path, remote_path in ((local, remote), (local_hf, remote_hf)):
        opened = open_checkpoint(remote_path)
        assert_same_opened(opened, open_checkpoint(local_path))
        assert opened.files.is_dir() and not workdir_lib.is_remote(opened.files)
    assert open_checkpoint(remote_hf).chat_template == template

    outputs = {}
    for path in (local, remote, local_hf, remote_hf):
        assert generate.main(["--checkpoint", str(path), "--prompt", "def main(", "--max_new_tokens", "6",
                              "--chat"]) == 0, capsys.readouterr().err
        outputs[str(path)] = capsys.readouterr().out
    assert outputs[remote] == outputs[str(local)] and outputs[remote_hf] == outputs[str(local_hf)]


def test_a_bucket_checkpoint_loads_straight_into_its_shards(exported):
    local_hf, remote_hf = exported
    mesh = make_mesh(parse_mesh("fsdp=4,tensor=2"))
    a, b = convert.load_hf(local_hf, mesh=mesh), convert.load_hf(remote_hf, mesh=mesh)
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        assert x.sharding == y.sharding and np.array_equal(np.asarray(x), np.asarray(y))


def test_finetuning_from_a_bucket_checkpoint_equals_finetuning_from_a_local_one(runs, exported, cache_dir, tmp_path):
    """configs/finetune.py on a gs:// checkpoint (Hugging Face, or a llama_jax workdir): the same weights, tokenizer
    and generation settings as from the local copy of it."""
    from test_train import finetune_config

    source = tmp_path / "docs"
    source.mkdir()
    for name in ("argparse.py", "csv.py", "glob.py"):
        (source / name).write_bytes((Path(os.__file__).parent / name).read_bytes())
    (local_hf, remote_hf), (local_run, remote_run, _) = exported, runs
    for kind, local, remote in (("hf", local_hf, remote_hf), ("ours", local_run, remote_run)):
        for where, checkpoint_path in (("local", local), ("remote", remote)):
            cfg = finetune_config(checkpoint_path, cache_dir, source, lr=0.0, weight_decay=0.0)
            trainer.train(cfg, tmp_path / kind / where)
        kept = {name for name in local_files(tmp_path / kind / "local")
                if name.startswith("tokenizer") or name == "generation_config.json"}
        assert kept >= ({"tokenizer.json", "generation_config.json"} if kind == "hf" else {"tokenizer.model"}), kept
        for name in kept:
            assert (tmp_path / kind / "remote" / name).read_bytes() == (tmp_path / kind / "local" / name).read_bytes()
        assert_same_params(tmp_path / kind / "remote", tmp_path / kind / "local")
        assert_same_params(tmp_path / kind / "remote", local)  # lr 0: the checkpoint's weights


def test_a_prepared_corpus_in_a_bucket_is_refused_with_the_gcsfuse_fix(bucket, cache_dir, tmp_path):
    """Searched for raw text, a bucket's prepared directory (ArrayRecord, which reads local files only) gave "no files
    match"; the error now says to mount the bucket."""
    from llama_jax.data.prepare import prepare
    from llama_jax.data.tokenizer import train_bpe

    texts = [(Path(os.__file__).parent / name).read_text() for name in ("argparse.py", "csv.py", "glob.py")]
    train_bpe(texts, 1024, tmp_path / "tokenizer.model")
    prepare(texts, tmp_path / "tokenizer.model", tmp_path / "prepared", workers=1, eval_fraction=0)
    for file in (tmp_path / "prepared").rglob("*"):
        if file.is_file():
            (epath.Path(bucket) / "prepared" / file.relative_to(tmp_path / "prepared")).write_bytes(file.read_bytes())
    cfg = small_config(cache_dir, 2)
    cfg.data.source, cfg.data.tokenizer = f"{bucket}/prepared", str(tmp_path / "tokenizer.model")
    with pytest.raises(DataError, match=rf"source 'data' {bucket}/prepared is a URL, .* mount the bucket with gcsfuse"):
        trainer.train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_chat_data_and_its_tokenizer_in_a_bucket_prepare_as_local_copies_do(exported, bucket, tmp_path):
    """prepare --chat with the conversations and the tokenizer (its chat template too) in a bucket: the same examples
    as from local copies. The conversations were globbed on the local disk only, and the template looked for there."""
    from llama_jax.data import prepare as prepare_module
    from llama_jax.data.shards import ShardedCorpus

    local_hf, _ = exported
    template = "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
    chats = "".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                             {"role": "assistant", "content": f"Answer {i}."}]}) + "\n"
                    for i in range(12))
    files = {"tokenizer/chat_template.jinja": template, "chats/a.jsonl": chats,
             **{f"tokenizer/{name}": (local_hf / name).read_text() for name in ("tokenizer.json", "tokenizer_config.json")}}
    examples = {}
    for where, root in (("local", str(tmp_path / "in")), ("remote", f"{bucket}/chat_inputs")):
        for name, text in files.items():
            target = epath.Path(root) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        out = tmp_path / where
        assert prepare_module.main(["--chat", "--source", f"{root}/chats/*.jsonl", "--tokenizer", f"{root}/tokenizer",
                                    "--out", str(out), "--workers", "1", "--eval_fraction", "0"]) == 0
        corpus = ShardedCorpus.open(out / "train")
        examples[where] = [(corpus.read(i).tolist(), corpus.read_loss_mask(i).tolist()) for i in range(len(corpus))]
    assert len(examples["local"]) == 12 and examples["remote"] == examples["local"]
    tokenizer = Tokenizer.from_file(tmp_path / "in" / "tokenizer")
    assert tokenizer.decode(examples["remote"][0][0]).startswith("<<user>> Question"), "the bucket's own template"


def test_an_evaluation_task_file_in_a_bucket_loads_as_a_local_one(exported, bucket):
    """train.eval_tasks / evaluate --tasks: a gs:// JSON Lines file was read as the local path gs:/..., not found."""
    from llama_jax.evaluate import BUILTIN_TASKS, ChoiceTask

    local_hf, _ = exported
    tokenizer = Tokenizer.from_file(local_hf)
    remote = epath.Path(bucket) / "tasks" / "stdlib_mc.jsonl"
    remote.write_bytes(BUILTIN_TASKS["stdlib_mc"].read_bytes())
    assert ChoiceTask.load(str(remote), tokenizer, max_len=256) == ChoiceTask.load("stdlib_mc", tokenizer, max_len=256)


def test_prompt_files_in_a_bucket_read_as_local_ones(bucket, tmp_path):
    """generate --prompts_file and rejection_sample --prompts / --out take URLs (they were local paths only)."""
    from llama_jax import rejection_sample

    for name, text in (("prompts.txt", "def main(\nclass A:\n"), ("prompts.jsonl", '{"prompt": "Hi"}\n')):
        (tmp_path / name).write_text(text)
        (epath.Path(bucket) / "prompts" / name).write_text(text)
    assert generate.read_prompts(f"{bucket}/prompts/prompts.txt") == generate.read_prompts(tmp_path / "prompts.txt")
    assert (rejection_sample.read_prompts(f"{bucket}/prompts/prompts.jsonl")
            == rejection_sample.read_prompts(tmp_path / "prompts.jsonl") == [[{"role": "user", "content": "Hi"}]])
    with pytest.raises(DataError, match=f"prompts file {bucket}/prompts/none.jsonl does not exist"):
        rejection_sample.read_prompts(f"{bucket}/prompts/none.jsonl")


def test_a_bucket_run_rewinds_and_retrains_as_a_local_one(runs, bucket, cache_dir, capsys):
    local, _, _ = runs
    workdir = f"{bucket}/rewound"
    trainer.train(small_config(cache_dir, 6), workdir)  # checkpoints 3 and 6
    assert rewind.main([workdir, "--step", "3", "--skip_batches", "1"]) == 0
    assert "moved checkpoints [6] to" in capsys.readouterr().out
    assert sorted(p.name for p in (epath.Path(workdir) / "checkpoints").iterdir()) == ["3"]
    [aside] = (epath.Path(workdir) / "rewound").iterdir()
    assert (aside / "6" / "meta" / "metadata").exists()
    assert len(read_remote_metrics(str(aside))) == 6
    assert rewind.main([workdir, "--step", "3"]) == 0  # and no skip after all
    trainer.train(small_config(cache_dir, 6), workdir)
    assert "Skipping" not in capsys.readouterr().out
    assert [m["step"] for m in read_remote_metrics(workdir)] == list(range(1, 7)), "every step logged once"
    assert [m["loss"] for m in read_remote_metrics(workdir)] == [m["loss"] for m in read_metrics(local)]
