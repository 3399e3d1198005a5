"""TPU pods through the gcloud CLI alone: ask for the slice, install the code on every worker, start the supervised
trainer, follow worker 0's log, and start over on a new slice when the old one is preempted.

    python -m llama_jax.launch tpu --config configs/llama3_8b.py --name llama-8b --accelerator v5p-512 \\
        --zone us-east5-a --project my-project --workdir gs://my-bucket/runs/llama-8b [--spot] [--num-slices 2]

The life of a launch (`plan()` lists the commands of a launch that meets no preemption; --dry-run prints them):
1. pack this checkout into a tarball (llama_jax/launch/remote.py says what goes in);
2. ask for the slice: a queued resource by default (`gcloud compute tpus queued-resources create`, which waits for
   capacity instead of failing; `--node-count` for several slices), or `tpu-vm create` with --on-demand;
3. poll `describe` until it is ACTIVE (queued) or READY (a VM);
4. on every worker of every slice: copy the tarball (`tpu-vm scp --worker=all`) and run `launch/tpu_worker.sh install`
   (a Python >= 3.11 virtualenv, `pip install -e ".[gcs,tpu]"`), then `tpu_worker.sh start`: `python -m
   llama_jax.supervise -- python -m llama_jax.train --config FILE --workdir WORKDIR`, detached with setsid/nohup and
   logging to ~/llama_jax_run/log, so that a dropped ssh connection does not end it;
5. stream worker 0's log (`tail --pid` ends with the supervisor) while a thread polls `describe` every
   --poll-seconds; a slice that is no longer ACTIVE/READY (preempted, suspended, deleted) ends the stream;
6. then, if the slice is gone: delete it, ask for a new one and go back to 2; the trainer resumes from the newest
   checkpoint in the gs:// workdir. If it is up: worker 0's exit code ends the launch (the slice is deleted after a
   finished run and kept after a failed one, for its logs); a run that vanished without an exit code (a VM restart)
   is started again; a dropped connection is followed again from the line where it stopped.
Running the same launch command again while the slice exists attaches to the run instead of starting a second one.
"""

from __future__ import annotations

import concurrent.futures
import sys
import threading
from typing import Callable, Sequence

from llama_jax.launch import gcloud, remote
from llama_jax.launch.executor import Executor, LaunchError, Result, shell_line
from llama_jax.launch.gcloud import Health
from llama_jax.launch.tpu_job import TpuJob

_SSH_FAILED = 255  # ssh's own exit code: the VM did not answer (the remote command's code is passed on otherwise)
_DESCRIBE_TRIES = 3


def coordinator_placeholder(job: TpuJob) -> str:
    return f"<ip-of-{job.nodes[0]}-worker-0>"


def plan(job: TpuJob) -> list[list[str]]:
    """The commands of a launch on a fresh slice that runs to the end unpreempted, in order (the dry run)."""
    bundle = remote.bundle_path(job.name)
    commands = [remote.pack(job.repo, bundle), gcloud.describe(job), gcloud.create(job), gcloud.describe(job),
                gcloud.ssh(job, job.nodes[0], remote.status(), worker="0")]
    for node in job.nodes:
        commands += [gcloud.scp(job, node, bundle, remote.REMOTE_BUNDLE), gcloud.ssh(job, node, remote.install())]
    if job.multislice:
        commands.append(gcloud.describe_node(job, job.nodes[0]))
    commands += [gcloud.ssh(job, node, _start_command(job, index, coordinator_placeholder(job)))
                 for index, node in enumerate(job.nodes)]
    return commands + [gcloud.ssh(job, job.nodes[0], remote.stream(1), worker="0", keepalive=True),
                       gcloud.describe(job), gcloud.ssh(job, job.nodes[0], remote.status(), worker="0"),
                       gcloud.delete(job)]


def _start_command(job: TpuJob, slice_id: int, coordinator_ip: str) -> str:
    env = gcloud.megascale_env(job, slice_id, coordinator_ip) if job.multislice else None
    return remote.start(job.config, job.workdir, job.overrides, env)


class TpuLauncher:
    """Runs one launch by the rules in this module's docstring, every command through `executor`."""

    def __init__(self, job: TpuJob, executor: Executor, poll_seconds: float = 30.0,
                 out: Callable[[str], None] = print):
        self.job, self.executor, self.poll_seconds, self.out = job, executor, poll_seconds, out
        self.recreations = 0

    def launch(self) -> int:
        self._check(self.executor.run(remote.pack(self.job.repo, remote.bundle_path(self.job.name))),
                    "packing the repository")
        while True:
            self._provision()
            code = self._run_on_slice()
            if code is not None:
                return self._end(code)
            self.recreations += 1
            self._say(f"slice {self.job.name} is gone (preempted or deleted): deleting it and asking for a new one "
                      f"(recreation {self.recreations}); the run resumes from {self.job.workdir}")
            self._delete()

    def teardown(self) -> int:
        self._delete()
        return 0

    def _provision(self) -> None:
        """Returns once the slice is up: creates it if it is missing, and again if it is lost before it is up."""
        created, last = False, None
        while True:
            health = self._health()
            if health is Health.READY:
                self._say(f"slice {self.job.name} is ready")
                return
            if health is Health.FAILED:
                raise LaunchError(f"the request for {self.job.name} failed: {self._failure_detail()}; fix the cause "
                                  "(quota, capacity, a flag), delete it with --teardown and launch again")
            if health is Health.GONE:
                self._say(f"slice {self.job.name} was lost before it was up: deleting it and asking again")
                self._delete()
                created = False
                continue
            if health is Health.MISSING and not created:
                self._check(self.executor.run(gcloud.create(self.job)), f"creating {self.job.name}")
                created = True
                continue
            if health is not last:
                self._say(f"waiting for slice {self.job.name} ({health.value})")
                last = health
            self.executor.sleep(self.poll_seconds)

    def _run_on_slice(self) -> int | None:
        """Worker 0's exit code, or None when the slice was lost."""
        if self._status() == "running":
            self._say(f"a run is already going on {self.job.name}: following it")
        else:
            self._install()
            self._start()
        line = 1
        while True:
            line = self._follow(line)
            if self._health() is not Health.READY:
                return None
            status = self._status()
            if isinstance(status, int):
                return status
            if status == "none":
                self._say("the run on worker 0 ended without an exit code (a VM restart?): starting it again")
                self._start()
                line = 1
            else:  # still running (the connection dropped) or unreachable for now
                self.executor.sleep(self.poll_seconds)

    def _install(self) -> None:
        bundle = remote.bundle_path(self.job.name)

        def one(node: str) -> None:
            self._check(self.executor.run(gcloud.scp(self.job, node, bundle, remote.REMOTE_BUNDLE)),
                        f"copying the code to {node}")
            self._check(self.executor.run(gcloud.ssh(self.job, node, remote.install())), f"installing on {node}")

        self._say(f"installing on {len(self.job.nodes)} slice(s)")
        with concurrent.futures.ThreadPoolExecutor(len(self.job.nodes)) as pool:
            for done in [pool.submit(one, node) for node in self.job.nodes]:
                done.result()

    def _start(self) -> None:
        coordinator = ""
        if self.job.multislice:
            answer = self._check(self.executor.run(gcloud.describe_node(self.job, self.job.nodes[0])),
                                 f"describing {self.job.nodes[0]}")
            coordinator = gcloud.first_worker_ip(answer.stdout)
        for index, node in enumerate(self.job.nodes):
            self._check(self.executor.run(gcloud.ssh(self.job, node, _start_command(self.job, index, coordinator))),
                        f"starting the run on {node}")
        self._say(f"started on every worker; following worker 0 of {self.job.nodes[0]}")

    def _follow(self, line: int) -> int:
        """Streams worker 0's log from `line` until the run ends, the connection drops, or the slice is no longer
        up; returns the next line to stream."""
        seen = 0
        stop, watching = threading.Event(), threading.Event()

        def echo(text: str) -> None:
            nonlocal seen
            seen += 1
            self.out(text)

        def watch() -> None:
            while not watching.wait(self.poll_seconds):
                try:
                    if self._health() not in (Health.READY, Health.PENDING):
                        stop.set()
                        return
                except LaunchError:
                    continue  # a failed describe says nothing about the slice; the next poll asks again

        watcher = threading.Thread(target=watch, name="tpu-slice-watch", daemon=True)
        watcher.start()
        try:
            command = gcloud.ssh(self.job, self.job.nodes[0], remote.stream(line), worker="0", keepalive=True)
            self.executor.stream(command, echo, stop)
        finally:
            watching.set()
            watcher.join()
        return line + seen

    def _status(self) -> int | str:
        """Worker 0's exit code, "running", "none" (nothing there, or the run died without a code) or
        "unreachable"."""
        answer = self.executor.run(gcloud.ssh(self.job, self.job.nodes[0], remote.status(), worker="0"))
        if answer.returncode == _SSH_FAILED:
            return "unreachable"
        lines = answer.stdout.split()
        if answer.returncode != 0 or not lines:
            return "none"
        last = lines[-1]
        return int(last) if last.lstrip("-").isdigit() else last

    def _health(self) -> Health:
        for attempt in range(_DESCRIBE_TRIES):
            answer = self.executor.run(gcloud.describe(self.job))
            try:
                return gcloud.health(self.job, answer.returncode, answer.stdout, answer.stderr)
            except ValueError as err:
                problem = str(err)
            if attempt + 1 < _DESCRIBE_TRIES:
                self.executor.sleep(self.poll_seconds)
        raise LaunchError(f"`{shell_line(gcloud.describe(self.job))}` failed {_DESCRIBE_TRIES} times: {problem}; "
                          "check `gcloud auth login`, --project and --zone")

    def _failure_detail(self) -> str:
        answer = self.executor.run(gcloud.describe(self.job))
        return gcloud.failure_detail(answer.stdout) or "no reason given"

    def _delete(self) -> None:
        answer = self.executor.run(gcloud.delete(self.job))
        if answer.returncode != 0 and "NOT_FOUND" not in answer.stderr:
            self._check(answer, f"deleting {self.job.name}")

    def _end(self, code: int) -> int:
        if code == 0:
            self._say(f"the run finished after {self.recreations} recreation(s); deleting slice {self.job.name}")
            self._delete()
        else:
            self._say(f"the run ended with exit code {code} (see llama_jax/supervise.py); slice {self.job.name} is "
                      "kept for its logs (~/llama_jax_run/log on each worker): delete it with the same command and "
                      "--teardown")
        return code

    def _check(self, answer: Result, what: str) -> Result:
        if answer.returncode != 0:
            raise LaunchError(f"{what} failed (exit code {answer.returncode}): "
                              f"{(answer.stderr or answer.stdout).strip()[-2000:]}")
        return answer

    @staticmethod
    def _say(message: str) -> None:
        print(f"launch: {message}", file=sys.stderr, flush=True)


def print_plan(commands: Sequence[Sequence[str]], out: Callable[[str], None] = print) -> None:
    for command in commands:
        out(shell_line(command))
