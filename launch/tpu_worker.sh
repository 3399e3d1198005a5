#!/usr/bin/env bash
# The worker's side of `python -m llama_jax.launch tpu`: it runs on every TPU VM worker of the slice, over
# `gcloud compute tpus tpu-vm ssh`, from the copy of the repository the launcher unpacked in ~/llama_jax.
#
#   tpu_worker.sh install                       a Python >= 3.11 virtualenv ($VENV) with this checkout installed
#                                               (`pip install -e ".[gcs,tpu]"`: gs:// workdirs and jax[tpu])
#   tpu_worker.sh start CONFIG WORKDIR [--config.KEY=VALUE ...]
#                                               the supervised training command, detached from the ssh session
#                                               (setsid nohup), so a dropped connection does not end it
#   tpu_worker.sh stream FROM_LINE              the run's log from line FROM_LINE until the run ends
#   tpu_worker.sh status                        the run's exit code, "running", or "none" (never started here, or
#                                               died without an exit code, e.g. with a VM restart)
#
# Files, in $RUN: log (the run's stdout and stderr), pid (the detached wrapper's pid), exit (its exit code).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${LLAMA_JAX_VENV:-$HOME/llama_jax_venv}
RUN=${LLAMA_JAX_RUN_DIR:-$HOME/llama_jax_run}

running() {
  [ -f "$RUN/pid" ] && kill -0 "$(cat "$RUN/pid")" 2>/dev/null
}

install() {
  if [ ! -x "$VENV/bin/python" ]; then
    # TPU VM images ship Ubuntu's python3 (3.10 on 22.04): take python3 when it is new enough, else python3.11.
    if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then PY=python3; else PY=python3.11; fi
    if ! "$PY" -m venv "$VENV" 2>/dev/null; then  # that python, or its venv module, is not installed
      sudo apt-get -qq update
      sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y "$PY" "$PY-venv"
      "$PY" -m venv --clear "$VENV"
    fi
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip
  cd "$REPO" && "$VENV/bin/python" -m pip install -q -e ".[gcs,tpu]"
}

start() {
  if [ $# -lt 2 ]; then echo "usage: $0 start CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2; exit 2; fi
  if running; then
    echo "a run is already going on this worker (pid $(cat "$RUN/pid")): left as it is" >&2
    exit 0
  fi
  mkdir -p "$RUN"
  rm -f "$RUN/exit"
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  cd "$REPO"
  # The wrapper records the supervisor's exit code ($0 is the exit file); the supervisor restarts the trainer.
  setsid nohup bash -c 'python -m llama_jax.supervise -- python -m llama_jax.train --config "$1" --workdir "$2" \
      "${@:3}"; echo $? > "$0.tmp" && mv "$0.tmp" "$0"' "$RUN/exit" "$@" > "$RUN/log" 2>&1 < /dev/null &
  echo $! > "$RUN/pid"
}

stream() {
  if [ ! -f "$RUN/pid" ]; then echo "no run was started on this worker" >&2; exit 1; fi
  exec tail -n "+${1:-1}" --pid="$(cat "$RUN/pid")" -F "$RUN/log"
}

status() {
  if [ -f "$RUN/exit" ]; then cat "$RUN/exit"
  elif running; then echo running
  else echo none
  fi
}

case "${1:-}" in
  install|start|stream|status) command=$1; shift; "$command" "$@" ;;
  *) echo "usage: $0 install | start CONFIG WORKDIR [--config.KEY=VALUE ...] | stream FROM_LINE | status" >&2
     exit 2 ;;
esac
