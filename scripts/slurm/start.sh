#!/usr/bin/env bash
# Start a single-node SLURM on this machine, for tests: munged, slurmctld and slurmd as root.
#
# Usage:  eval "$(scripts/slurm/start.sh)"      # prints `export SLURM_CONF=...` on stdout
#
# Everything (slurm.conf, state, spool, PID and log files) lives in one folder,
# ${CMB_SLURM_DIR:-/tmp/cmb-slurm}; /etc/slurm is not touched, so clients need SLURM_CONF.
# The node is this host (`hostname -s`) at 127.0.0.1 (no DNS), with all its CPUs, one default
# partition `debug`. Idempotent: a daemon is started only if its PID file's process is dead.
# Waits until the node is `idle` (30 s at most). Stop with scripts/slurm/stop.sh.
# Needs root and Debian's slurmctld, slurmd, slurm-client and munge
# (scripts/install-test-system-deps.sh). Exit codes: 0 ready, 2 cannot start here, 1 failed.
set -euo pipefail

DIR="${CMB_SLURM_DIR:-/tmp/cmb-slurm}"
CONF="${DIR}/slurm.conf"
log() { echo "slurm/start: $*" >&2; }
cannot() { log "cannot start: $*"; exit 2; }

[ "$(id -u)" = "0" ] || cannot "not root (slurmd and munged need root here)"
for cmd in munged munge slurmctld slurmd sinfo sbatch scontrol; do
    command -v "${cmd}" > /dev/null 2>&1 \
        || cannot "${cmd} not found (run scripts/install-test-system-deps.sh as root)"
done

alive() { [ -s "$1" ] && kill -0 "$(cat "$1" 2> /dev/null)" 2> /dev/null; }

# ---- munge: key, runtime folders owned by munge, then munged --force as the munge user
MUNGE_PID=/run/munge/munged.pid
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
chmod 0400 /etc/munge/munge.key
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
mkdir -p "${DIR}"
if ! alive "${MUNGE_PID}"; then
    runuser -u munge -- munged --force
    echo "started" > "${DIR}/munged.ours"
    log "munged started"
fi
for _ in $(seq 50); do
    munge -n < /dev/null 2> /dev/null | unmunge > /dev/null 2>&1 && break
    sleep 0.1
done
munge -n < /dev/null | unmunge > /dev/null || { log "munge does not work"; exit 1; }

# ---- slurm.conf for this host (written only when no daemon of ours runs)
HOST="$(hostname -s)"
if ! alive "${DIR}/slurmctld.pid" && ! alive "${DIR}/slurmd.pid"; then
    if [ -f "${CONF}" ] && ! grep -q "^NodeName=${HOST} " "${CONF}"; then
        log "host name changed: wiping ${DIR}"
        find "${DIR}" -mindepth 1 -maxdepth 1 ! -name munged.ours -exec rm -rf {} +
    fi
    mkdir -p "${DIR}/state" "${DIR}/spool"
    CPUS="$(nproc)"
    MEM="$(slurmd -C 2> /dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)"
    MEM="${MEM:-1000}"
    cat > "${CONF}.tmp" << CONFEOF
# single-node SLURM for cmb-bidsapp tests (scripts/slurm/start.sh)
ClusterName=cmbtest
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/slurmctld.pid
SlurmdPidFile=${DIR}/slurmd.pid
SlurmctldLogFile=${DIR}/slurmctld.log
SlurmdLogFile=${DIR}/slurmd.log
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
CONFEOF
    mv "${CONF}.tmp" "${CONF}"
fi
export SLURM_CONF="${CONF}"

# ---- daemons: controller first, then the node daemon
if ! alive "${DIR}/slurmctld.pid"; then
    slurmctld -f "${CONF}" || { tail -n 20 "${DIR}/slurmctld.log" >&2; exit 1; }
    log "slurmctld started"
fi
if ! alive "${DIR}/slurmd.pid"; then
    slurmd -f "${CONF}" || { tail -n 20 "${DIR}/slurmd.log" >&2; exit 1; }
    log "slurmd started"
fi

# ---- wait for the node
state=""
for _ in $(seq 150); do
    state="$(sinfo -h -n "${HOST}" -o %t 2> /dev/null | head -n1 || true)"
    case "${state}" in
        idle | mix | alloc) break ;;
        down* | drain* | drng*) scontrol update NodeName="${HOST}" State=RESUME 2> /dev/null || true ;;
    esac
    sleep 0.2
done
case "${state}" in
    idle | mix | alloc) ;;
    *)
        log "node ${HOST} is '${state:-unknown}' after 30 s"
        tail -n 10 "${DIR}/slurmctld.log" "${DIR}/slurmd.log" >&2 || true
        exit 1
        ;;
esac
log "ready: node ${HOST} is ${state} (SLURM_CONF=${CONF})"
echo "export SLURM_CONF=${CONF}"
