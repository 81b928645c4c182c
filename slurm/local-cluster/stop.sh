#!/usr/bin/env bash
# Stop the local single-node cluster that start.sh started: only the daemons whose pid files it wrote under
# $SLURM_LOCAL_DIR/pids (a munged or database that was already running elsewhere is left alone).
#
#   bash slurm/local-cluster/stop.sh            # stop; state (jobs, accounting database) is kept
#   bash slurm/local-cluster/stop.sh --purge    # stop, then delete the state folder and the config files it wrote
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  exec sudo --preserve-env=SLURM_LOCAL_DIR,SLURM_LOCAL_WAIT bash "$0" "$@"
fi

DIR="${SLURM_LOCAL_DIR:-/tmp/slurm-local}"
WAIT="${SLURM_LOCAL_WAIT:-60}"
PIDS="$DIR/pids"
MARK="# written by raddino-bench slurm/local-cluster/start.sh"
purge=0
case "${1:-}" in
  "") ;;
  --purge) purge=1 ;;
  *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac

# stop NAME: TERM the recorded process if it is still that program, wait for it, KILL it after $WAIT s.
stop() {
  local f="$PIDS/$1.pid" pid
  [ -s "$f" ] || return 0
  pid=$(head -n1 "$f")
  if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]; then
    kill "$pid" 2>/dev/null || true
    local deadline=$(( $(date +%s) + WAIT ))
    while [ -d "/proc/$pid" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.1; done
    if [ -d "/proc/$pid" ]; then
      echo "local-cluster: $1 ($pid) ignored TERM for ${WAIT} s; killing it" >&2
      kill -9 "$pid" 2>/dev/null || true
    fi
    echo "local-cluster: stopped $1 ($pid)"
  fi
  rm -f "$f"
}

# Jobs of this cluster first: their processes would otherwise outlive slurmd (they run under slurmstepd).
if [ -s "$PIDS/slurmctld.pid" ] && [ "$(cat "/proc/$(head -n1 "$PIDS/slurmctld.pid")/comm" 2>/dev/null)" = slurmctld ]; then
  if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
    scancel --full --partition=debug 2>/dev/null || true
    for _ in $(seq 100); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.1; done
  fi
fi

# Clients first, then the controller, accounting, its database, and munge last (the others use it to shut down).
for d in slurmd slurmctld slurmdbd mariadbd munged; do
  stop "$d"
done

if [ "$purge" = 1 ]; then
  rm -rf "$DIR"
  for f in /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf; do
    if [ -f "$f" ] && [ "$(head -n1 "$f")" = "$MARK" ]; then rm -f "$f"; fi
  done
  echo "local-cluster: purged $DIR"
fi
