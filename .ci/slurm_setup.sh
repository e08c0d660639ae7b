#!/usr/bin/env bash
# Start a SLURM cluster on this machine for the `slurm`-marked integration tests: this host as node of the default
# partition `debug`, and (where network namespaces can be made) node1 and node2 as partition `twonode`.
#
# Idempotent: installs slurm-wlm and munge only when missing (needs root and apt), (re)writes
# /etc/slurm/slurm.conf only when its content changes, starts munged / slurmctld / the slurmds only when they
# are not running (restarts the SLURM daemons when the config changed), then waits until the nodes are idle.
# Safe to run again; exits non-zero with one line on stderr when the cluster cannot be brought up.
#
#   sudo .ci/slurm_setup.sh            # then: pytest -m slurm
#
# Environment: SLURM_SETUP_NO_INSTALL=1 skips the apt step; SLURM_SETUP_NO_NODES=1 leaves out node1/node2;
# SLURM_SETUP_WAIT_S (default 60) bounds each wait.
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

# ------------------------------------------------------------------------------------------- two more nodes
# node1 and node2, for multi-node jobs: each slurmd in its own network namespace (ddpnode1/2, 10.99.0.11/12 on the
# bridge ddpbr0, 10.99.0.1 here) with its own host name (a UTS namespace); they share this machine's files, like
# nodes on a shared file system. SLURM_SETUP_NO_NODES=1 leaves them out; if the namespaces cannot be made, the
# one-node cluster still comes up (the multi-node tests then say why they skip).
NODES_OK=0
make_nodes() {
    ip link show ddpbr0 >/dev/null 2>&1 || ip link add ddpbr0 type bridge || return 1
    ip addr show dev ddpbr0 | grep -q "10.99.0.1/24" || ip addr add 10.99.0.1/24 dev ddpbr0 || return 1
    ip link set ddpbr0 up || return 1
    local n
    for n in 1 2; do
        ip netns list | grep -qw "ddpnode$n" || ip netns add "ddpnode$n" || return 1
        if ! ip link show "ddpveth$n" >/dev/null 2>&1; then
            ip link add "ddpveth$n" type veth peer name eth0 netns "ddpnode$n" || return 1
        fi
        ip link set "ddpveth$n" master ddpbr0 up || return 1
        ip -n "ddpnode$n" addr show dev eth0 | grep -q "10.99.0.1$n/24" \
            || ip -n "ddpnode$n" addr add "10.99.0.1$n/24" dev eth0 || return 1
        ip -n "ddpnode$n" link set eth0 up && ip -n "ddpnode$n" link set lo up || return 1
        grep -qE "^10\.99\.0\.1$n[[:space:]]+node$n\b" /etc/hosts || echo "10.99.0.1$n node$n" >>/etc/hosts
    done
}
if [[ "${SLURM_SETUP_NO_NODES:-0}" != 1 ]] && command -v ip >/dev/null && command -v unshare >/dev/null; then
    if make_nodes 2>/dev/null; then NODES_OK=1; else log "network namespaces unavailable: one node only"; fi
fi
CTLD="$HOST"
[[ $NODES_OK == 1 ]] && CTLD="$HOST(10.99.0.1)"  # the address the namespaced slurmds reach the controller at

# ------------------------------------------------------------------------------------------- slurm.conf
mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/log/slurm
NEW_CONF=$(cat <<EOF
# Written by .ci/slurm_setup.sh: a test cluster on this machine.
ClusterName=local
SlurmctldHost=$CTLD
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=5
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd.%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.%n.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.%n.log
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
if [[ $NODES_OK == 1 ]]; then
    NEW_CONF+=$'\n'"NodeName=node1 NodeAddr=10.99.0.11 CPUs=$CPUS RealMemory=8000 State=UNKNOWN"
    NEW_CONF+=$'\n'"NodeName=node2 NodeAddr=10.99.0.12 CPUs=$CPUS RealMemory=8000 State=UNKNOWN"
    NEW_CONF+=$'\n'"PartitionName=twonode Nodes=node1,node2 MaxTime=INFINITE State=UP"
fi
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
    for node in "$HOST" node1 node2; do stop slurmd "/run/slurmd.$node.pid"; done
    stop slurmd /run/slurmd.pid  # a cluster set up by an older version of this script
    stop slurmctld /run/slurmctld.pid
fi
if ! running slurmctld /run/slurmctld.pid; then
    log "starting slurmctld"
    /usr/sbin/slurmctld || die "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
fi
if ! running slurmd "/run/slurmd.$HOST.pid"; then
    log "starting slurmd"
    mkdir -p "/var/spool/slurmd.$HOST"
    /usr/sbin/slurmd || die "slurmd did not start (see /var/log/slurm/slurmd.$HOST.log)"
fi
if [[ $NODES_OK == 1 ]]; then
    for n in 1 2; do
        running slurmd "/run/slurmd.node$n.pid" && continue
        log "starting slurmd for node$n in network namespace ddpnode$n"
        mkdir -p "/var/spool/slurmd.node$n"
        # nsenter, not `ip netns exec`: that remounts /sys, and slurmd needs /sys/fs/cgroup
        nsenter --net="/run/netns/ddpnode$n" unshare --uts sh -c "hostname node$n && exec /usr/sbin/slurmd -N node$n" \
            || log "slurmd node$n did not start (see /var/log/slurm/slurmd.node$n.log)"
    done
fi

# ------------------------------------------------------------------------------------------- ready?
WAIT_S=${SLURM_SETUP_WAIT_S:-60}
STATE=""
for _ in $(seq $((WAIT_S * 2))); do
    STATE=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1 || true)
    case $STATE in
        idle|mixed|allocated|completing) log "ready: node $HOST is $STATE"; break ;;
        drain*|down*|fail*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
case $STATE in idle|mixed|allocated|completing) ;; *)
    die "node $HOST is not usable after ${WAIT_S}s (state '${STATE:-none}'); see /var/log/slurm/" ;; esac
if [[ $NODES_OK == 1 ]]; then  # the extra nodes are optional: wait for them, but only report
    for _ in $(seq $((WAIT_S * 2))); do
        STATES=$(sinfo -h -p twonode -o %T 2>/dev/null | sort -u | tr '\n' ' ')
        [[ $STATES == "idle " ]] && { log "ready: node1 and node2 (partition twonode) are idle"; exit 0; }
        for n in node1 node2; do
            case $(sinfo -h -n "$n" -o %T 2>/dev/null) in drain*|down*|fail*)
                scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true ;; esac
        done
        sleep 0.5
    done
    log "warning: node1/node2 are not idle after ${WAIT_S}s (states: ${STATES:-none}); multi-node tests will skip"
fi
exit 0
