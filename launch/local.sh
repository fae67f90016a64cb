#!/usr/bin/env bash
# Run N cooperating JAX processes on this machine (127.0.0.1), M CPU devices each: a real
# multi-process run on one machine, the same code path as a multi-host cluster.
#
#   launch/local.sh N [M] -- COMMAND [ARGS...]
#   launch/local.sh 2 2 -- gpt2jax train configs/demo.yaml --train.steps=20
#   launch/local.sh 2 -- python -m gpt2jax.distributed --selftest
#
# M defaults to 1 (one device per process, like one GPU per process).
# Each process gets GPT2JAX_COORDINATOR=127.0.0.1:PORT (a free port, or $GPT2JAX_PORT),
# GPT2JAX_NUM_PROCESSES=N, GPT2JAX_PROCESS_ID=i, GPT2JAX_LOCAL_DEVICES=M (also as
# --xla_force_host_platform_device_count=M in XLA_FLAGS) and JAX_PLATFORMS=cpu (unless set). Output lines are prefixed with "[i] ".
# If one process fails, the others are stopped; the exit status is the first failure's
# (0 when all succeed). COMMAND is looked up on PATH; if it is not found there, the
# repository's .venv/bin/COMMAND is used when it exists.
set -euo pipefail

usage() {
  echo "usage: $0 N [M] -- COMMAND [ARGS...]   (N processes x M CPU devices)" >&2
  exit 2
}

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

[[ $# -ge 2 ]] || usage
N=$1
shift
M=1
if [[ $1 != "--" ]]; then
  M=$1
  shift
fi
[[ $# -ge 1 && $1 == "--" ]] || usage
shift
[[ $# -ge 1 ]] || usage
is_count "$N" || { echo "local.sh: error: N must be a count >= 1, got '$N'" >&2; exit 2; }
is_count "$M" || { echo "local.sh: error: M must be a count >= 1, got '$M'" >&2; exit 2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cmd=("$@")
if ! command -v "${cmd[0]}" >/dev/null 2>&1 && [[ -x $here/../.venv/bin/${cmd[0]} ]]; then
  cmd[0]=$here/../.venv/bin/${cmd[0]}
fi

free_port() {
  # Ask the kernel for an unused port; any Python will do (no jax import).
  local py
  for py in python3 python "$here/../.venv/bin/python"; do
    if command -v "$py" >/dev/null 2>&1; then
      "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
      return
    fi
  done
  echo $((20000 + RANDOM % 20000))
}
port=${GPT2JAX_PORT:-$(free_port)}

# Prefix every line (also a last line without newline) with the process id.
prefix() {
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    printf '[%s] %s\n' "$1" "$line"
  done
}

run_one() {
  local i=$1
  shift
  export GPT2JAX_COORDINATOR=127.0.0.1:$port GPT2JAX_NUM_PROCESSES=$N
  export GPT2JAX_PROCESS_ID=$i GPT2JAX_LOCAL_DEVICES=$M
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} PYTHONUNBUFFERED=1
  # Also for JAX programs other than gpt2jax: replace any device count already in XLA_FLAGS.
  local -a words=() kept=()
  local word
  read -r -a words <<<"${XLA_FLAGS:-}"
  for word in "${words[@]}"; do
    [[ $word == --xla_force_host_platform_device_count=* ]] || kept+=("$word")
  done
  export XLA_FLAGS="${kept[*]:+${kept[*]} }--xla_force_host_platform_device_count=$M"
  # exec: the background job's pid is the command's pid, so it can be signalled directly.
  exec "$@"
}

pids=()
stop_all() {
  local sig=$1 pid
  for pid in "${pids[@]}"; do
    if [[ -n $pid ]]; then kill "-$sig" "$pid" 2>/dev/null || true; fi
  done
}
trap 'stop_all TERM; exit 130' INT TERM

# Output goes through named pipes to prefixing jobs of this shell, so that we can wait
# for the last lines before exiting.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printers=()
for ((i = 0; i < N; i++)); do
  mkfifo "$tmp/out$i" "$tmp/err$i"
  prefix "$i" <"$tmp/out$i" &
  printers+=("$!")
  prefix "$i" <"$tmp/err$i" >&2 &
  printers+=("$!")
  run_one "$i" "${cmd[@]}" >"$tmp/out$i" 2>"$tmp/err$i" &
  pids+=("$!")
done

# Poll rather than `wait -n` (bash >= 4.3 only, and it would also report the printers).
any_alive() {
  local pid
  for pid in "${pids[@]}"; do
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then return 0; fi
  done
  return 1
}

status=0
left=$N
while ((left > 0)); do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    if [[ -z $pid ]] || kill -0 "$pid" 2>/dev/null; then continue; fi
    rc=0
    wait "$pid" || rc=$?
    pids[i]=""
    left=$((left - 1))
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "local.sh: process $i exited with status $rc; stopping the others" >&2
      stop_all TERM
      for _ in 1 2 3 4 5 6 7 8 9 10; do  # up to 5 s to exit cleanly, then insist
        if ! any_alive; then break; fi
        sleep 0.5
      done
      stop_all KILL
    fi
  done
  if ((left > 0)); then sleep 0.2; fi
done
# A process stopped before it opened its pipes leaves its printers blocked in open():
# give every printer a writer that closes at once (O_RDWR never blocks on a FIFO), wait up
# to 10 s for the last lines (a printer is a bash loop, slow on a loaded machine; only a
# leftover grandchild holding a pipe keeps one waiting), then stop any that is stuck.
for ((i = 0; i < N; i++)); do
  : 1<>"$tmp/out$i" 1<>"$tmp/err$i"
done
for _ in {1..100}; do
  alive=0
  for pid in "${printers[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  ((alive)) || break
  sleep 0.1
done
kill "${printers[@]}" 2>/dev/null || true
wait "${printers[@]}" 2>/dev/null || true
exit "$status"
