"""A stand-in for the `gcloud` CLI, for tests/test_launch.py: installed as `gcloud` first on PATH, it records every
call and plays a scripted slice (created, queued, up, preempted, gone) and the run on its worker 0.

The scenario and the slice's state live in $FAKE_GCLOUD_DIR/state.json, the calls in $FAKE_GCLOUD_DIR/calls.jsonl
(one JSON list of arguments per call). State keys:
  queued: bool                  queued resource (describe answers {"state": {"state": S}}) or a TPU VM ({"state": S})
  pending: [S, ...]             the states that `describe` answers after a create, one per call; the last one stays
  failure: str                  the message of a FAILED queued resource
  signed_out: bool              every call fails as gcloud does without credentials
  lives: [{"log": [...], "then": "exit" | "drop" | "preempt" | "vanish" | "hang", "code": N, "lost": S}, ...]
        what each stream call does: print the log from the line asked for, then exit with `code` (the run finished),
        drop the connection (the run goes on), or lose the slice: `preempt` (describe answers `lost`, ssh fails),
        `vanish` (the resource is gone: NOT_FOUND) or `hang` (describe answers `lost` while the stream stays open
        until the launcher ends it)
  exists, states, life, started, exit: the slice's current state (set by the calls)
"""

import fcntl
import json
import os
import shlex
import sys
import time
from pathlib import Path

DIR = Path(os.environ["FAKE_GCLOUD_DIR"])
SSH_FAILED = 255


def main(argv: list[str]) -> int:
    with open(DIR / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads((DIR / "state.json").read_text())
        with open(DIR / "calls.jsonl", "a") as calls:
            calls.write(json.dumps(argv) + "\n")
        code, hang = act(state, argv)
        (DIR / "state.json").write_text(json.dumps(state))
    if hang:  # outside the lock: the launcher's describes go on while this stream stays open
        time.sleep(30)
    return code


def act(state: dict, argv: list[str]) -> tuple[int, bool]:
    kind, verb, name = argv[2], argv[3], argv[4]
    if state.get("signed_out"):
        return fail("ERROR: (gcloud) You do not currently have an active account selected.", 1), False
    if verb == "create":
        if state["exists"]:
            return fail("ALREADY_EXISTS: the resource already exists", 1), False
        state.update(exists=True, states=list(state["pending"]), started=False, exit=None)
        return 0, False
    if verb == "delete":
        if not state["exists"]:
            return fail("NOT_FOUND: Resource not found", 1), False
        state["exists"] = False
        return 0, False
    if verb == "describe":
        return describe(state, kind, name), False
    if not state["exists"] or state["states"][0] not in ("ACTIVE", "READY"):
        return fail("ssh: connect to host 10.0.0.2 port 22: Connection timed out", SSH_FAILED), False
    if verb == "scp":
        return 0, False
    command = shlex.split(next(arg for arg in argv if arg.startswith("--command="))[len("--command="):])
    script = next(index for index, word in enumerate(command) if word.endswith("tpu_worker.sh"))
    return ssh(state, command[script + 1], command[script + 2:])


def describe(state: dict, kind: str, name: str) -> int:
    if kind == "tpu-vm" and state["queued"]:  # a multislice node, asked for worker 0's address
        print(json.dumps({"state": "READY", "networkEndpoints": [{"ipAddress": "10.0.0.2"}]}))
        return 0
    if not state["exists"]:
        return fail(f"ERROR: (gcloud) NOT_FOUND: {name} not found", 1)
    current = state["states"][0]
    if len(state["states"]) > 1:
        state["states"].pop(0)
    failed = {"failedData": {"error": {"message": state["failure"]}}} if current == "FAILED" else {}
    print(json.dumps({"state": {"state": current, **failed}} if state["queued"] else
                     {"state": current, "networkEndpoints": [{"ipAddress": "10.0.0.2"}]}))
    return 0


def ssh(state: dict, action: str, arguments: list[str]) -> tuple[int, bool]:
    if action == "status":
        if state["exit"] is not None:
            print(state["exit"])
        elif state["started"]:
            print("running")
        else:
            return fail("bash: llama_jax/launch/tpu_worker.sh: No such file or directory", 127), False
        return 0, False
    if action == "install":
        return 0, False
    if action == "start":
        state.update(started=True, exit=None)
        return 0, False
    life = state["lives"][state["life"]]
    for line in life["log"][int(arguments[0]) - 1:]:
        print(line, flush=True)
    state["life"] += 1
    if life["then"] == "exit":
        state["exit"] = life["code"]
        return 0, False
    if life["then"] == "drop":  # the connection drops; the slice and the run go on
        return fail("Connection to 10.0.0.2 closed.", SSH_FAILED), False
    if life["then"] == "vanish":
        state["exists"] = False
    else:
        state["states"] = [life["lost"]]
    if life["then"] == "hang":
        return 0, True
    return fail("Connection to 10.0.0.2 closed by remote host.", SSH_FAILED), False


def fail(message: str, code: int) -> int:
    print(message, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
