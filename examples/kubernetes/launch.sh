#!/bin/bash
# The command each pod of examples/kubernetes/finetune-job.yaml runs: one torchrun per pod, all pods meeting at
# pod 0 of the Indexed Job (reachable by name through the headless Service), then `trainer run "$@"`.
#
# Environment (set by the Job manifest): NNODES (pods), NPROC_PER_NODE (processes per pod, default: the GPUs the
# pod sees, else 1), RDZV_HOST (pod 0's DNS name), RDZV_PORT (default 29500), JOB_COMPLETION_INDEX (set by
# Kubernetes for Indexed Jobs: this pod's rank among the pods), RUN_ID (rendezvous id, default: sftkit).
#
# Exit 3 from `trainer run` means "stopped after saving a checkpoint" (the pod got SIGTERM, e.g. on preemption or
# a node drain); the Job's podFailurePolicy counts that as retriable, and the retried pod resumes from the
# checkpoint because --resume auto is the default.
set -uo pipefail

: "${NNODES:?set NNODES to the number of pods}"
: "${RDZV_HOST:?set RDZV_HOST to pod 0 (e.g. sftkit-0.sftkit)}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1
fi
export PYTHONUNBUFFERED=1  # plain per-step log lines reach `kubectl logs` as they are printed
exec torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --node-rank "${JOB_COMPLETION_INDEX:-0}" \
  --rdzv-id "${RUN_ID:-sftkit}" --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:${RDZV_PORT:-29500}" \
  -m cli.trainer run "$@"
