#!/usr/bin/env bash
# Run an `mstar` command on every worker of a Cloud TPU VM slice.
#
#   tpu_scripts/launch.sh --tpu NAME --zone ZONE [--project P] [--create TYPE [--version V]] [--repo URL|--copy]
#                         [--repo-dir DIR] [--dry-run] -- train --config configs/X.py --workdir gs://B/run
#
# --create makes the slice first (TYPE e.g. v5litepod-8, v5p-16); --repo clones URL on every worker, --copy ships
# this checkout; without either, DIR must already hold one. Every worker installs `.[tpu]`, then runs the same
# `mstar ...` command with MSTAR_DISTRIBUTED=auto, so that jax.distributed.initialize() finds the slice's
# coordinator, process count and process id from the TPU VM metadata (mstar_jax.sharding.initialize_distributed).
set -euo pipefail

TPU="" ZONE="" PROJECT="" DRY=0 COPY=0 REPO="" REPO_DIR="mstar-jax" CREATE="" VERSION="tpu-ubuntu2204-base"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --copy) COPY=1; shift ;;
    --repo) REPO="$2"; shift 2 ;;
    --create) CREATE="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --repo-dir) REPO_DIR="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --) shift; break ;;
    *) echo "unknown flag $1 (put the mstar command after --)" >&2; exit 2 ;;
  esac
done
[[ -n "$TPU" && -n "$ZONE" ]] || { echo "usage: $0 --tpu NAME --zone ZONE [--project P] [--create TYPE [--version V]] [--repo URL|--copy] [--dry-run] -- MSTAR_ARGS..." >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "missing the mstar command after --" >&2; exit 2; }
[[ -z "$REPO" || $COPY -eq 0 ]] || { echo "--repo and --copy both say where the code comes from: give one" >&2; exit 2; }
# Every worker writes its checkpoint shards to the workdir, so on a multi-host slice it must be shared storage.
for ((i = 1; i <= $#; i++)); do
  arg="${!i}"; next=$((i + 1))
  if [[ "$arg" == --workdir=* ]]; then wd="${arg#--workdir=}"; elif [[ "$arg" == --workdir && $i -lt $# ]]; then wd="${!next}"; else continue; fi
  [[ "$wd" == gs://* ]] || echo "warning: --workdir $wd is not a gs:// URL; on a slice of several hosts each worker would write its own copy" >&2
done

GCLOUD=(gcloud compute tpus tpu-vm)
PROJ=()
[[ -n "$PROJECT" ]] && PROJ=(--project "$PROJECT")
MSTAR_ARGS=$(printf '%q ' "$@")
REMOTE="set -e; cd ${REPO_DIR} && python3 -m pip install -q -e '.[tpu]' && MSTAR_DISTRIBUTED=auto python3 -m mstar_jax.cli ${MSTAR_ARGS}"

run() {
  if [[ $DRY -eq 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# ${PROJ[@]+...}: bash 3.2 (macOS) calls an empty array unbound under `set -u`.
if [[ -n "$CREATE" ]]; then
  run "${GCLOUD[@]}" create "$TPU" --zone "$ZONE" --accelerator-type "$CREATE" --version "$VERSION" ${PROJ[@]+"${PROJ[@]}"}
fi
if [[ -n "$REPO" ]]; then
  run "${GCLOUD[@]}" ssh "$TPU" --zone "$ZONE" --worker=all ${PROJ[@]+"${PROJ[@]}"} \
    --command "if [ -d ${REPO_DIR}/.git ]; then git -C ${REPO_DIR} pull --ff-only; else git clone $(printf '%q' "$REPO") ${REPO_DIR}; fi"
elif [[ $COPY -eq 1 ]]; then
  # Ship this checkout to every worker (no git remote needed).
  tmp=$(mktemp -d)  # (GNU mktemp's --suffix is missing on macOS)
  trap 'rm -rf "$tmp"' EXIT
  tarball="$tmp/mstar-jax.tar.gz"
  run tar czf "$tarball" --exclude=.git --exclude=runs --exclude=.venv --exclude=__pycache__ -C "$(dirname "$0")/.." .
  run "${GCLOUD[@]}" scp "$tarball" "$TPU:/tmp/mstar-jax.tar.gz" --zone "$ZONE" --worker=all ${PROJ[@]+"${PROJ[@]}"}
  run "${GCLOUD[@]}" ssh "$TPU" --zone "$ZONE" --worker=all ${PROJ[@]+"${PROJ[@]}"} \
    --command "mkdir -p ${REPO_DIR} && tar xzf /tmp/mstar-jax.tar.gz -C ${REPO_DIR}"
fi
run "${GCLOUD[@]}" ssh "$TPU" --zone "$ZONE" --worker=all ${PROJ[@]+"${PROJ[@]}"} --command "$REMOTE"
