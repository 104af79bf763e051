#!/usr/bin/env bash
# Run an `mstar` command on every worker of a Cloud TPU VM slice.
#
#   tpu_scripts/launch.sh --tpu NAME --zone ZONE [--project P] [--repo URL|--copy] [--dry-run] -- train --config configs/X.py --workdir gs://B/run
#
# Every worker installs `.[tpu]` from its checkout of this repository, then runs the same `mstar ...` command;
# jax.distributed discovers the slice by itself on TPU VMs (mstar_jax.sharding.initialize_distributed).
set -euo pipefail

TPU="" ZONE="" PROJECT="" DRY=0 COPY=0 REPO_DIR="mstar-jax"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --copy) COPY=1; shift ;;
    --repo-dir) REPO_DIR="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --) shift; break ;;
    *) echo "unknown flag $1 (put the mstar command after --)" >&2; exit 2 ;;
  esac
done
[[ -n "$TPU" && -n "$ZONE" ]] || { echo "usage: $0 --tpu NAME --zone ZONE [--project P] [--copy] [--dry-run] -- MSTAR_ARGS..." >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "missing the mstar command after --" >&2; exit 2; }

GCLOUD=(gcloud compute tpus tpu-vm)
PROJ=()
[[ -n "$PROJECT" ]] && PROJ=(--project "$PROJECT")
MSTAR_ARGS=$(printf '%q ' "$@")
REMOTE="set -e; cd ${REPO_DIR} && python3 -m pip install -q -e '.[tpu]' && python3 -m mstar_jax.cli ${MSTAR_ARGS}"

run() {
  if [[ $DRY -eq 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [[ $COPY -eq 1 ]]; then
  # Ship this checkout to every worker (no git remote needed).
  tarball=$(mktemp --suffix=.tar.gz)
  run tar czf "$tarball" --exclude=.git --exclude='runs' -C "$(dirname "$0")/.." .
  run "${GCLOUD[@]}" scp "$tarball" "$TPU:/tmp/mstar-jax.tar.gz" --zone "$ZONE" --worker=all "${PROJ[@]}"
  run "${GCLOUD[@]}" ssh "$TPU" --zone "$ZONE" --worker=all "${PROJ[@]}" \
    --command "mkdir -p ${REPO_DIR} && tar xzf /tmp/mstar-jax.tar.gz -C ${REPO_DIR}"
fi
run "${GCLOUD[@]}" ssh "$TPU" --zone "$ZONE" --worker=all "${PROJ[@]}" --command "$REMOTE"
