"""Rewinding a run to an earlier checkpoint (`python -m llama_jax.rewind`), with and without skipping batches."""

import json
import shutil
from pathlib import Path

import numpy as np
from etils import epath

from cli_run import cache_dir, read_metrics, without_timing  # noqa: F401 (a fixture)
from test_train import small_config

from llama_jax import checkpoint, generate, trainer
from llama_jax import workdir as workdir_lib
from llama_jax.goodput import LOST, REDONE
from llama_jax.rewind import main


def saved_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def keeping_all(cfg):
    cfg.checkpoint.max_to_keep = 10
    return cfg


def test_a_rewound_run_retrains_from_the_step_exactly_and_keeps_what_it_moved(tmp_path, cache_dir, capsys):
    straight = tmp_path / "straight"
    trainer.train(keeping_all(small_config(cache_dir, 9)), straight)
    workdir = tmp_path / "rewound"
    trainer.train(keeping_all(small_config(cache_dir, 9)), workdir)
    diverged = read_metrics(workdir)
    (workdir / "averaged").mkdir()  # a phase's average of checkpoints 6 and 9, as the trainer records it
    (workdir / "averaged" / "eval.json").write_text(json.dumps({"averaged/eval_loss": 1.0, "steps": [6, 9]}))

    assert main([str(workdir), "--step", "3"]) == 0
    said = capsys.readouterr().out
    assert "moved checkpoints [6, 9] and the averaged model to" in said and "resumes from step 3." in said
    assert saved_steps(workdir) == [3]
    [aside] = (workdir / "rewound").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["6", "9", "averaged", "metrics.jsonl", "rewind.json"]
    moved, ref = (checkpoint.load_model(path)[0] for path in (aside / "9", straight))
    assert np.array_equal(np.asarray(moved.layers.attn.wq[...]), np.asarray(ref.layers.attn.wq[...])), "still readable"
    # with the run's tokenizer, which generate looked for in WORKDIR/rewound (not found: exit 2)
    assert generate.main(["--checkpoint", str(aside / "9"), "--prompt", "def", "--max_new_tokens", "2"]) == 0
    capsys.readouterr()
    assert (aside / "averaged" / "eval.json").exists() and not (workdir / "averaged").exists()
    assert [json.loads(line) for line in (aside / "metrics.jsonl").read_text().splitlines()] == diverged
    assert json.loads((aside / "rewind.json").read_text()) == {
        "to_step": 3, "moved_steps": [6, 9], "averaged_moved": True, "skip_batches": 0}
    assert not (workdir / "skip_batches.json").exists()

    trainer.train(keeping_all(small_config(cache_dir, 9)), workdir)
    assert "Resumed from" in capsys.readouterr().out
    lines = read_metrics(workdir)
    assert [m["step"] for m in lines] == list(range(1, 10)), "every step logged once"
    assert without_timing(lines) == without_timing(read_metrics(straight))
    assert lines[-1][LOST + REDONE] > 0, "the steps trained again count as redone in the goodput"
    a, b = (checkpoint.load_model(w)[0] for w in (straight, workdir))
    assert np.array_equal(np.asarray(a.layers.attn.wq[...]), np.asarray(b.layers.attn.wq[...]))


def frozen(cache_dir: Path, steps: int):
    """With a learning rate of 0 the parameters never change, so each step's loss tells which batch it trained on."""
    cfg = keeping_all(small_config(cache_dir, steps))
    cfg.optim.lr = 0.0
    return cfg


def test_skipped_batches_are_those_after_the_step_every_time_a_run_resumes_from_it(tmp_path, cache_dir, capsys):
    straight = tmp_path / "straight"
    trainer.train(frozen(cache_dir, 11), straight)
    loss = {m["step"]: m["loss"] for m in read_metrics(straight)}
    assert len(set(loss.values())) == 11, "each batch must give its own loss for this test to tell them apart"

    workdir = tmp_path / "run"
    trainer.train(frozen(cache_dir, 6), workdir)
    assert main([str(workdir), "--step", "3", "--skip_batches", "2"]) == 0
    assert "skipping the 2 batches after it" in capsys.readouterr().out
    trainer.train(frozen(cache_dir, 5), workdir)
    assert "Skipping the 2 batches after step 3" in capsys.readouterr().out
    assert [m["loss"] for m in read_metrics(workdir)] == [loss[s] for s in (1, 2, 3, 6, 7)]

    shutil.rmtree(workdir / "checkpoints" / "5")  # the process died before saving step 5: back to 3, skip again
    trainer.train(frozen(cache_dir, 7), workdir)
    assert "Skipping the 2 batches after step 3" in capsys.readouterr().out
    assert [m["loss"] for m in read_metrics(workdir)] == [loss[s] for s in (1, 2, 3, 6, 7, 8, 9)]
    trainer.train(frozen(cache_dir, 9), workdir)  # from step 7's checkpoint: its data position is past the skip
    assert "Skipping" not in capsys.readouterr().out
    assert [m["loss"] for m in read_metrics(workdir)] == [loss[s] for s in (1, 2, 3, 6, 7, 8, 9, 10, 11)]

    assert main([str(workdir), "--step", "7", "--skip_batches", "1"]) == 0
    assert json.loads((workdir / "skip_batches.json").read_text()) == {"3": 2, "7": 1}
    # A rewind without a skip takes the recorded one back, and those of the later checkpoints it moves aside: step
    # 7's was kept, and a run that came back to step 7 skipped again.
    assert main([str(workdir), "--step", "3"]) == 0
    assert json.loads((workdir / "skip_batches.json").read_text()) == {}
    newest = max((workdir / "rewound").iterdir())
    assert json.loads((newest / "rewind.json").read_text())["moved_steps"] == [6, 7]
    assert json.loads((newest / "skip_batches.json").read_text()) == {"3": 2, "7": 1}


def test_a_step_finds_its_run_in_a_workdir_or_among_the_rewound_whatever_the_workdir_is_named():
    for step, run in (("/runs/big/rewound/20261208-000916-769814/9", "/runs/big"),
                      ("/runs/rewound/checkpoints/9", "/runs/rewound"), ("/runs/big/checkpoints/9", "/runs/big")):
        assert checkpoint.SavedRun(epath.Path(step), {}).run_dir == epath.Path(run)


def test_bad_rewinds_are_refused_with_the_fix(tmp_path, cache_dir, capsys):
    assert main([str(tmp_path / "nowhere"), "--step", "3"]) == 2
    assert "checkpoints does not exist: give the --workdir of a run that saved checkpoints" in capsys.readouterr().err
    workdir = tmp_path / "run"
    trainer.train(small_config(cache_dir, 6), workdir)  # checkpoints 3 and 6
    assert main([str(workdir), "--step", "4"]) == 2
    assert "has no checkpoint of step 4 (its steps: [3, 6]): rewind to one of them" in capsys.readouterr().err
    assert main([str(workdir), "--step", "3", "--skip_batches", "-1"]) == 2
    assert "--skip_batches=-1" in capsys.readouterr().err
    holder = workdir_lib.lock(workdir_lib.resolve(workdir))
    assert main([str(workdir), "--step", "3"]) == 2
    assert "is in use by a running job" in capsys.readouterr().err
    holder.release()
    assert saved_steps(workdir) == [3, 6] and not (workdir / "rewound").exists(), "a refused rewind moved nothing"
    assert main([str(workdir), "--step", "6"]) == 0
    assert "no later checkpoint" in capsys.readouterr().out and saved_steps(workdir) == [3, 6]

    before = read_metrics(workdir)
    assert main([str(workdir), "--step", "3"]) == 0
    lower = small_config(cache_dir, 6)
    lower.optim.lr /= 2  # what a rewind is often for
    trainer.train(lower, workdir)
    after = read_metrics(workdir)
    assert after[:3] == before[:3] and [m["lr"] for m in after[3:]] == [m["lr"] / 2 for m in before[3:]]
