#!/usr/bin/env bash
# Run a gpt2jax command on every host of a Cloud TPU VM slice.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE [options] -- COMMAND [ARGS...]
#   launch/tpu_pod.sh --name lm --zone us-west4-a --accelerator-type v5litepod-16 --delete \
#       -- gpt2jax train configs/gpt2_124m_pretrain.yaml --mesh.data=1 --mesh.fsdp=-1
#
# Steps: create the slice unless it exists (reuse), copy this checkout to every worker and
# install it into ~/gpt2jax-venv with jax[tpu] (skip with --no-install), run COMMAND on all
# workers at once (--worker=all; jax.distributed finds its peers from the TPU metadata),
# stream every worker's output prefixed with its host name (also appended to
# ~/gpt2jax-run.log on each worker), and with --delete remove the slice afterwards, also
# when the command fails. --dry-run prints the gcloud commands instead of running them.
#
# Options:
#   --name NAME               TPU VM name (required)
#   --zone ZONE               e.g. us-west4-a (required)
#   --project PROJECT         default: gcloud's configured project
#   --accelerator-type TYPE   default v5litepod-16 (4 hosts x 4 chips)
#   --version VERSION         TPU VM runtime image; default chosen from the type
#   --spot                    create a Spot slice
#   --no-install              the workers already have the package
#   --delete                  delete the slice when done
#   --dry-run                 print the commands, run nothing
set -euo pipefail

die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }

name="" zone="" project="" type="v5litepod-16" version="" spot=0 install=1 delete=0 dry=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) name=${2:?}; shift 2 ;;
    --zone) zone=${2:?}; shift 2 ;;
    --project) project=${2:?}; shift 2 ;;
    --accelerator-type) type=${2:?}; shift 2 ;;
    --version) version=${2:?}; shift 2 ;;
    --spot) spot=1; shift ;;
    --no-install) install=0; shift ;;
    --delete) delete=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n $name ]] || die "--name is required"
[[ -n $zone ]] || die "--zone is required"
[[ $# -ge 1 ]] || die "give the command to run after --, e.g. -- gpt2jax train CONFIG"
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$name': lowercase letters, digits, '-'"

if [[ -z $version ]]; then
  case $type in
    v5litepod-*) version="v2-alpha-tpuv5-lite" ;;
    v5p-*) version="v2-alpha-tpuv5" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    *) version="tpu-ubuntu2204-base" ;;
  esac
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
where=(--zone="$zone")
[[ -n $project ]] && where+=(--project="$project")
tpu=(gcloud compute tpus tpu-vm)

# Shell-quote one word only when it needs it (readable dry-run output that is valid shell).
quote() {
  if [[ $1 =~ ^[-A-Za-z0-9_./:=@%+,]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Print (dry run: one command a line) or run one command.
run() {
  if ((dry)); then
    local first=1 word
    for word in "$@"; do
      ((first)) || printf ' '
      first=0
      quote "$word"
    done
    echo
  else
    "$@"
  fi
}

# 1. create or reuse
if ((dry)); then
  echo "# reuse the slice if it exists, else create it:"
  run "${tpu[@]}" describe "$name" "${where[@]}"
  create=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$type" --version="$version")
  ((spot)) && create+=(--spot)
  run "${create[@]}"
elif "${tpu[@]}" describe "$name" "${where[@]}" --format='value(state)' >/dev/null 2>&1; then
  echo "tpu_pod.sh: reusing $name" >&2
else
  create=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$type" --version="$version")
  ((spot)) && create+=(--spot)
  run "${create[@]}"
fi

cleanup() {
  local rc=$?
  if ((delete)); then run "${tpu[@]}" delete "$name" "${where[@]}" --quiet; fi
  exit "$rc"
}
trap cleanup EXIT

# 2. install this checkout on every worker
if ((install)); then
  tarball=${TMPDIR:-/tmp}/gpt2jax-src-$$.tgz
  run tar -czf "$tarball" -C "$here" --exclude=./.venv --exclude=./runs --exclude=./.git \
    --exclude=__pycache__ --exclude=./.ruff_cache .
  run "${tpu[@]}" scp "$tarball" "$name:gpt2jax-src.tgz" "${where[@]}" --worker=all
  setup='set -e; rm -rf ~/gpt2jax; mkdir -p ~/gpt2jax; tar -xzf ~/gpt2jax-src.tgz -C ~/gpt2jax'
  setup+='; python3 -m venv ~/gpt2jax-venv; ~/gpt2jax-venv/bin/pip install -q -U pip'
  setup+='; ~/gpt2jax-venv/bin/pip install -q -c ~/gpt2jax/constraints.txt -e ~/gpt2jax "jax[tpu]"'
  run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$setup"
  ((dry)) || rm -f "$tarball"
fi

# 3. the same command on all workers at once, output prefixed with the worker's host name
user_cmd=$(for word in "$@"; do quote "$word"; printf ' '; done)
# shellcheck disable=SC2016  # $PATH and $(hostname) expand on the worker, not here
remote='set -o pipefail; cd ~/gpt2jax && export PATH=~/gpt2jax-venv/bin:$PATH PYTHONUNBUFFERED=1'
remote+=" && { ${user_cmd}; } 2>&1 | tee -a ~/gpt2jax-run.log | sed -u \"s/^/[\$(hostname)] /\""
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$remote"
