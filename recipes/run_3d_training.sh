#!/usr/bin/env bash
# Launch gpt3d the way the original 3D nanoGPT did: a config file and a process count.
#
#   recipes/run_3d_training.sh CONFIG NPROC [--section.key=value ...]
#   recipes/run_3d_training.sh recipes/configs/tp2_pp2.toml 4
#   recipes/run_3d_training.sh recipes/configs/dp2_pp2_tp2.toml 8 --training.steps=500
#
# is exactly (overrides pass through unchanged)
#
#   torchrun --standalone --nproc_per_node=NPROC recipes/train.py --config CONFIG [...]
#
# NPROC is processes per node (GPUs per node on a GPU box; on a CPU any number, gloo).
# Multi-node: run it on every node with NNODES=<nodes> RDZV_ENDPOINT=<head node>:29500
# (and RDZV_ID=<job id>); it then uses torchrun's c10d rendezvous instead of --standalone.
# More torchrun flags: TORCHRUN_ARGS="--max-restarts=3". Launcher: $TORCHRUN, else the
# torchrun on PATH (activate the venv first: . .venv/bin/activate).
set -euo pipefail

usage="usage: $0 CONFIG.toml NPROC [--section.key=value ...]"
if [[ $# -lt 2 || $1 == -h || $1 == --help ]]; then
    echo "$usage" >&2
    exit 2
fi
config=$1 nproc=$2
shift 2
if [[ ! -f $config ]]; then
    echo "run_3d_training.sh: config file '$config' not found; $usage" >&2
    exit 2
fi
if [[ ! $nproc =~ ^[1-9][0-9]*$ ]]; then
    echo "run_3d_training.sh: NPROC must be a positive integer, got '$nproc'; $usage" >&2
    exit 2
fi
read -r -a launcher <<<"${TORCHRUN:-torchrun}"
if ! command -v "${launcher[0]}" >/dev/null; then
    echo "run_3d_training.sh: '${launcher[0]}' not found; activate the venv" \
        "(. .venv/bin/activate) or set TORCHRUN" >&2
    exit 2
fi
read -r -a extra <<<"${TORCHRUN_ARGS:-}"
if [[ ${NNODES:-1} -gt 1 ]]; then
    rendezvous=(--nnodes="$NNODES" --rdzv-backend=c10d
        --rdzv-endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT=<head node>:29500 for NNODES > 1}"
        --rdzv-id="${RDZV_ID:-gpt3d}")
else
    rendezvous=(--standalone)
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
set -x
exec "${launcher[@]}" "${rendezvous[@]}" --nproc_per_node="$nproc" "${extra[@]}" \
    "$here/train.py" --config "$config" "$@"
