#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine for the `slurm`-marked integration tests.
#
# Idempotent: installs slurm-wlm and munge only when missing (needs root and apt), (re)writes
# /etc/slurm/slurm.conf only when its content changes, starts munged / slurmctld / slurmd only when they
# are not running (restarts the SLURM daemons when the config changed), then waits until the node is idle.
# Safe to run again; exits non-zero with one line on stderr when the cluster cannot be brought up.
#
#   sudo .ci/slurm_setup.sh            # then: pytest -m slurm
#
# Environment: SLURM_SETUP_NO_INSTALL=1 skips the apt step; SLURM_SETUP_WAIT_S (default 60) bounds the wait.
set -euo pipefail

log() { echo "slurm_setup: $*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts system daemons)"

# ------------------------------------------------------------------------------------------- packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
    [[ "${SLURM_SETUP_NO_INSTALL:-0}" == 1 ]] && die "slurm-wlm/munge are not installed"
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || apt-get update
    apt-get install -y -qq slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
fi

HOST=$(hostname -s)
CPUS=$(nproc)
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf

# ------------------------------------------------------------------------------------------- munge
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged || die "munged did not start"
    for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n </dev/null | unmunge >/dev/null 2>&1 || die "munge credentials do not round-trip"
fi

# ------------------------------------------------------------------------------------------- slurm.conf
mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
NEW_CONF=$(cat <<EOF
# Written by .ci/slurm_setup.sh: a one-node test cluster.
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=5
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
# Short kill grace and fast scheduling keep the test suite quick.
KillWait=5
MinJobAge=600
SchedulerParameters=sched_min_interval=0,batch_sched_delay=0,bf_interval=1,sched_interval=2
NodeName=$HOST CPUs=$CPUS RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)
CHANGED=0
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$NEW_CONF" ]]; then
    log "writing $CONF"
    printf '%s\n' "$NEW_CONF" >"$CONF"
    CHANGED=1
fi

# ------------------------------------------------------------------------------------------- daemons
running() {  # running NAME PIDFILE: the daemon recorded in PIDFILE is alive
    local pid
    [[ -f $2 ]] || return 1
    pid=$(cat "$2" 2>/dev/null) || return 1
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && [[ "$(cat /proc/"$pid"/comm 2>/dev/null)" == "$1" ]]
}
stop() {  # stop NAME PIDFILE: end the daemon recorded in PIDFILE (only that process)
    local pid
    running "$1" "$2" || return 0
    pid=$(cat "$2")
    log "stopping $1 (pid $pid)"
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}
if [[ $CHANGED == 1 ]]; then
    stop slurmd /run/slurmd.pid
    stop slurmctld /run/slurmctld.pid
fi
if ! running slurmctld /run/slurmctld.pid; then
    log "starting slurmctld"
    /usr/sbin/slurmctld || die "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
fi
if ! running slurmd /run/slurmd.pid; then
    log "starting slurmd"
    /usr/sbin/slurmd || die "slurmd did not start (see /var/log/slurm/slurmd.log)"
fi

# ------------------------------------------------------------------------------------------- ready?
WAIT_S=${SLURM_SETUP_WAIT_S:-60}
STATE=""
for _ in $(seq $((WAIT_S * 2))); do
    STATE=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1 || true)
    case $STATE in
        idle|mixed|allocated|completing) log "ready: node $HOST is $STATE"; exit 0 ;;
        drain*|down*|fail*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
die "node $HOST is not usable after ${WAIT_S}s (state '${STATE:-none}'); see /var/log/slurm/"
