"""Every command that writes an output refuses one it cannot write before doing its work, in one line naming the flag.

Before, each of them failed only when it came to write: after the conversion, the averaging or the sampling, with an
OSError traceback naming a temporary file."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from llama_jax import average, convert, lora, rejection_sample, workdir
from llama_jax.data import preferences, prepare, stdlib_chat
from llama_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def blocked(tmp_path):
    """A path under a file, which no one can create."""
    (tmp_path / "file").write_text("")
    return tmp_path / "file" / "out"


def commands(tmp_path, out):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    return [
        (convert.main, ["--from", "ours", "--to", "hf", str(tmp_path / "never-read"), str(out)], "the output directory"),
        (average.main, ["--out", str(out), str(tmp_path / "never-read")], "--out"),
        (lora.main, ["merge", str(tmp_path / "never-read"), "--out", str(out)], "--out"),
        (prepare.main, ["--source", str(prompts), "--tokenizer", "never-read", "--out", str(out)], "--out"),
        (preferences.main, ["--source", str(prompts), "--tokenizer", "never-read", "--out", str(out)], "--out"),
        (rejection_sample.main, ["--policy", "never-opened", "--reward", "never-opened", "--prompts", str(prompts),
                                 "--out", str(out / "best.jsonl")], "--out"),
        (stdlib_chat.main, ["prompts", "--out", str(out / "prompts.jsonl")], "--out"),
    ]


def test_an_output_under_a_file_is_refused_before_any_work(tmp_path, blocked, capsys):
    for main, argv, flag in commands(tmp_path, blocked):
        assert main(argv) == 2, main.__module__
        error = capsys.readouterr().err
        assert error.startswith(f"error: {flag} {blocked}") and f"cannot be written ({blocked.parent} is a file)" in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "prompts.jsonl"]


def test_an_output_of_the_wrong_kind_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ConfigError, match=r"--out .*/file cannot be written \(it is a file\): give a directory path"):
        workdir.check_writable(tmp_path / "file", "--out", directory=True)
    with pytest.raises(ConfigError, match=r"--out .*/dir cannot be written \(it is a directory\): give a file path"):
        workdir.check_writable(tmp_path / "dir", "--out", directory=False)
    workdir.check_writable(tmp_path / "dir", "--out", directory=True)
    workdir.check_writable(tmp_path / "file", "--out", directory=False)
    workdir.check_writable(tmp_path / "new" / "deeper", "--out", directory=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"], "a check creates nothing"


def test_a_directory_this_user_cannot_write_in_is_refused():
    """The permission branch, which root never takes (`os.access` says yes to root): a child process run by root
    imports the check, then becomes `nobody`, and checks a directory that only its owner may write in."""
    with tempfile.TemporaryDirectory() as top:
        os.chmod(top, 0o755)
        locked = Path(top) / "locked"
        locked.mkdir()
        os.chmod(locked, 0o555)
        shared = Path(top) / "shared"
        shared.mkdir()
        os.chmod(shared, 0o777)
        script = ("import os, sys\nfrom llama_jax import workdir\nfrom llama_jax.errors import ConfigError\n"
                  "if os.getuid() == 0:\n    os.setgid(65534); os.setuid(65534)\n"
                  "for out in sys.argv[1:]:\n"
                  "    try:\n        workdir.check_writable(out, '--out', directory=True)\n"
                  "    except ConfigError as e:\n        print(e)\n    else:\n        print('allowed')\n")
        result = subprocess.run([sys.executable, "-c", script, str(locked / "out"), str(locked / "a" / "b"),
                                 str(shared / "out")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    refused, refused_deeper, allowed = result.stdout.splitlines()
    assert refused == (f"--out {locked / 'out'} cannot be written (this user cannot write in {locked}): give a "
                       "directory path where this user can write")
    assert refused_deeper.startswith(f"--out {locked / 'a' / 'b'} cannot be written (this user cannot write in "
                                     f"{locked})")
    assert allowed == "allowed"
