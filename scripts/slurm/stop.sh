#!/usr/bin/env bash
# Stop the single-node SLURM of scripts/slurm/start.sh and wipe its folder. Idempotent.
#
# Order: cancel the jobs, `scontrol shutdown` (slurmctld and slurmd), then munged (only if
# start.sh started it), then remove ${CMB_SLURM_DIR:-/tmp/cmb-slurm}, so that a changed host
# name cannot block the next start.
set -uo pipefail

DIR="${CMB_SLURM_DIR:-/tmp/cmb-slurm}"
CONF="${DIR}/slurm.conf"
log() { echo "slurm/stop: $*" >&2; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1" 2> /dev/null)" 2> /dev/null; }

wait_gone() { # PID-file, seconds
    for _ in $(seq $(($2 * 10))); do
        alive "$1" || return 0
        sleep 0.1
    done
    return 1
}

if [ -f "${CONF}" ]; then
    export SLURM_CONF="${CONF}"
    if alive "${DIR}/slurmctld.pid"; then
        scancel --full --quiet --user="$(id -un)" 2> /dev/null || true
        scontrol shutdown 2> /dev/null || true
    fi
    for daemon in slurmd slurmctld; do
        pidfile="${DIR}/${daemon}.pid"
        if alive "${pidfile}" && ! wait_gone "${pidfile}" 10; then
            kill "$(cat "${pidfile}")" 2> /dev/null || true
            wait_gone "${pidfile}" 5 || kill -9 "$(cat "${pidfile}")" 2> /dev/null || true
        fi
        log "${daemon} stopped"
    done
fi

if [ -f "${DIR}/munged.ours" ] && alive /run/munge/munged.pid; then
    pid="$(cat /run/munge/munged.pid)"
    kill "${pid}" 2> /dev/null || true
    wait_gone /run/munge/munged.pid 5 || kill -9 "${pid}" 2> /dev/null || true
    log "munged stopped"
fi

rm -rf "${DIR}"
log "done"
