#!/usr/bin/env bash
# One machine, several processes: rank 0 hosts the server and trains clients, ranks 1.. train clients.
#   NPROC=3 launchers/one_node.sh configs/quickstart.yaml [--federation.mode=simulation ...]
# Each process gets OMP_NUM_THREADS cores; pick NPROC x OMP_NUM_THREADS <= the cores you have.
set -euo pipefail
config=${1:?usage: $0 CONFIG [fedpeft options]}; shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc-per-node="${NPROC:-2}" -m lightning_fedpeft fit --config "$config" "$@"
