"""A run whose workdir is a gs:// bucket: checkpoints, logs, resume and the workdir lease, against a local stand-in.

The stand-in is `gcp-storage-emulator`, an in-memory server speaking the Cloud Storage JSON API. Every client the run
uses is pointed at it: Orbax's TensorStore (TENSORSTORE_GCS_HTTP_URL) and etils.epath through gcsfs
(STORAGE_EMULATOR_HOST), which carries the logs, TensorBoard's events and the lease. So the same code paths as on a
real bucket run here.
"""

import json
import socket
import time

import jax
import numpy as np
import pytest
from etils import epath
from flax import nnx

from cli_run import cache_dir, read_metrics  # noqa: F401 (a fixture)
from test_train import small_config

from llama_jax import checkpoint, trainer
from llama_jax import workdir as workdir_lib
from llama_jax.errors import CheckpointError

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


@pytest.fixture(scope="module")
def bucket(monkeypatch_module):
    from gcp_storage_emulator.handlers import objects
    from gcp_storage_emulator.server import create_server

    monkeypatch_module.setattr(objects, "download", _with_generation_header(objects.download))

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    for key, value in dict(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="test").items():
        monkeypatch_module.setenv(key, value)
    yield f"gs://{BUCKET}"
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def read_remote_metrics(workdir: str) -> list[dict]:
    return [json.loads(line) for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_a_run_in_a_bucket_saves_resumes_and_loads_as_a_local_one(bucket, tmp_path, cache_dir):
    local = tmp_path / "local"
    trainer.train(small_config(cache_dir, 6), local)
    remote = f"{bucket}/resumed"
    trainer.train(small_config(cache_dir, 3), remote)
    assert sorted(p.name for p in (epath.Path(remote) / "checkpoints").iterdir()) == ["3"]
    trainer.train(small_config(cache_dir, 6), remote)
    expected = [m["loss"] for m in read_metrics(local)]
    assert [m["step"] for m in read_remote_metrics(remote)] == list(range(1, 7)), "every step logged once"
    assert [m["loss"] for m in read_remote_metrics(remote)] == expected
    assert any((epath.Path(remote) / "tensorboard").iterdir())
    model_a, _ = checkpoint.load_model(local)
    model_b, tokenizer = checkpoint.load_model(remote)
    assert tokenizer.startswith(remote)
    for a, b in zip(jax.tree.leaves(nnx.state(model_a)), jax.tree.leaves(nnx.state(model_b))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


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
