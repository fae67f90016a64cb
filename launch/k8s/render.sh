#!/usr/bin/env bash
# Fill in launch/k8s/{tpu,gpu}-job.yaml and apply it (or print it with --dry-run).
#
#   launch/k8s/render.sh --kind tpu --name lm --image IMAGE --hosts 4 \
#       [--tpu-accelerator tpu-v5-lite-podslice --tpu-topology 4x4 --chips-per-host 4] \
#       [--port 8476] [--dry-run] -- gpt2jax train configs/gpt2_124m_pretrain.yaml --mesh.data=1 --mesh.fsdp=-1
#   launch/k8s/render.sh --kind gpu --name lm --image IMAGE --hosts 2 \
#       [--gpu-type nvidia-h100-80gb --gpus 8] [--dry-run] -- gpt2jax train CONFIG
#
# Without --dry-run the YAML goes to `kubectl apply -f -` (add -n NAMESPACE through
# KUBECTL_ARGS="-n team"). Follow the logs with `kubectl logs -f job/NAME` (pod 0) or
# `kubectl logs -l job-name=NAME --prefix -f` (all pods).
set -euo pipefail
shopt -u patsub_replacement 2>/dev/null || true  # bash 5.2: '&' in ${x//a/b} is literal

die() { echo "render.sh: error: $*" >&2; exit 2; }

kind="" name="" image="" hosts="" port=8476 dry=0
tpu_accelerator=tpu-v5-lite-podslice tpu_topology=4x4 chips=4
gpu_type=nvidia-h100-80gb gpus=8
while [[ $# -gt 0 ]]; do
  case $1 in
    --kind) kind=${2:?}; shift 2 ;;
    --name) name=${2:?}; shift 2 ;;
    --image) image=${2:?}; shift 2 ;;
    --hosts) hosts=${2:?}; shift 2 ;;
    --port) port=${2:?}; shift 2 ;;
    --tpu-accelerator) tpu_accelerator=${2:?}; shift 2 ;;
    --tpu-topology) tpu_topology=${2:?}; shift 2 ;;
    --chips-per-host) chips=${2:?}; shift 2 ;;
    --gpu-type) gpu_type=${2:?}; shift 2 ;;
    --gpus) gpus=${2:?}; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ $kind == tpu || $kind == gpu ]] || die "--kind must be tpu or gpu"
[[ -n $image ]] || die "--image is required (a container image with gpt2jax installed)"
[[ $# -ge 1 ]] || die "give the command after --, e.g. -- gpt2jax train CONFIG"
# Job names become DNS labels (${name}-<index>): lowercase, digits, '-', short.
[[ $name =~ ^[a-z]([-a-z0-9]{0,45}[a-z0-9])?$ ]] ||
  die "--name '$name': 1-47 lowercase letters, digits or '-', starting with a letter"
is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
is_count "$hosts" || die "--hosts must be a count >= 1, got '$hosts'"
if ! is_count "$port" || ((port > 65535)); then die "--port must be 1..65535, got '$port'"; fi
if [[ $kind == tpu ]]; then
  is_count "$chips" || die "--chips-per-host must be a count >= 1"
  [[ $tpu_topology =~ ^[1-9][0-9]*(x[1-9][0-9]*)+$ ]] || die "--tpu-topology like 4x4 or 2x2x4"
  total=$((${tpu_topology//x/*}))
  ((hosts * chips == total)) ||
    die "--tpu-topology $tpu_topology has $total chips, but --hosts $hosts x --chips-per-host $chips = $((hosts * chips))"
else
  is_count "$gpus" || die "--gpus must be a count >= 1"
fi

json_str() {  # a JSON string is a valid YAML scalar
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\t'/\\t}
  s=${s//$'\n'/\\n}
  printf '"%s"' "$s"
}
command_json="["
for word in "$@"; do
  [[ $command_json == "[" ]] || command_json+=", "
  command_json+=$(json_str "$word")
done
command_json+="]"

workers=""
for ((i = 0; i < hosts; i++)); do
  workers+="${workers:+,}$name-$i.$name"
done

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
yaml=$(<"$here/$kind-job.yaml")
declare -A values=(
  [NAME]=$name [IMAGE]=$image [HOSTS]=$hosts [PORT]=$port [COMMAND]=$command_json
  [TPU_ACCELERATOR]=$tpu_accelerator [TPU_TOPOLOGY]=$tpu_topology [CHIPS_PER_HOST]=$chips
  [WORKER_HOSTNAMES]=$workers [GPU_TYPE]=$gpu_type [GPUS]=$gpus
)
for key in "${!values[@]}"; do
  yaml=${yaml//"\${$key}"/"${values[$key]}"}
done
if [[ $yaml =~ \$\{[A-Z_]+\} ]]; then die "unfilled placeholder ${BASH_REMATCH[0]}"; fi

if ((dry)); then
  printf '%s\n' "$yaml"
else
  # shellcheck disable=SC2086  # KUBECTL_ARGS is a list of words
  printf '%s\n' "$yaml" | kubectl apply ${KUBECTL_ARGS:-} -f -
fi
