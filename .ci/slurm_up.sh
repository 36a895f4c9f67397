#!/usr/bin/env bash
# Bring up a one-node Slurm cluster on this machine (CI, laptops, a fresh VM), as root:
#   sudo bash .ci/slurm_up.sh
# Installs Debian's slurm-wlm + munge when missing, writes a minimal /etc/slurm/slurm.conf for this host
# (2 CPUs, no cgroups, requeue allowed), creates the munge key, starts munged, slurmctld and slurmd
# without systemd, and waits until `sinfo` shows the node up. Idempotent: on an already configured,
# running cluster it only checks (a second or two). Exits non-zero with a message saying what failed.
#
# Knobs (environment): SLURM_CPUS (2), SLURM_MEM_MB (4000), SLURM_PARTITION (debug),
# SLURM_UP_TIMEOUT seconds to wait for the controller, then for the node (60 each).
set -euo pipefail

CPUS=${SLURM_CPUS:-2}
MEM=${SLURM_MEM_MB:-4000}
PARTITION=${SLURM_PARTITION:-debug}
TIMEOUT=${SLURM_UP_TIMEOUT:-60}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm

die() { echo "slurm_up: error: $*" >&2; exit 1; }
log() { echo "slurm_up: $*"; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"
HOST=$(hostname -s) || die "hostname -s failed"
[ -n "$HOST" ] || die "empty hostname"
getent hosts "$HOST" >/dev/null || die "hostname '$HOST' does not resolve; add it to /etc/hosts"

# --- 1. packages -------------------------------------------------------------------------------------
need_install=0
for bin in slurmctld slurmd sbatch srun scontrol sinfo munged munge; do
    command -v "$bin" >/dev/null 2>&1 || need_install=1
done
if [ "$need_install" = 1 ]; then
    command -v apt-get >/dev/null || die "slurm is not installed and apt-get is missing (Debian/Ubuntu only)"
    log "installing slurm-wlm and munge (apt-get)..."
    # No init system here: keep the packages' maintainer scripts from starting daemons themselves.
    own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt_install() { apt-get install -y -q --no-install-recommends slurm-wlm munge >/tmp/slurm_up_apt.log 2>&1; }
    if ! apt_install; then
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update -q >>/tmp/slurm_up_apt.log 2>&1 || true
        apt_install || { [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d; tail -20 /tmp/slurm_up_apt.log >&2
                     die "apt-get install slurm-wlm munge failed (log: /tmp/slurm_up_apt.log)"; }
    fi
    [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    for bin in slurmctld slurmd sbatch munged; do
        command -v "$bin" >/dev/null 2>&1 || die "$bin still missing after installing slurm-wlm munge"
    done
fi

# --- 2. munge ----------------------------------------------------------------------------------------
id munge >/dev/null 2>&1 || die "user 'munge' missing (the munge package creates it)"
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
    log "starting munged"
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged --force || die "munged failed to start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do munge_ok && break; sleep 0.2; done
    munge_ok || die "munged is not answering (munge -n | unmunge fails; see /var/log/munge/munged.log)"
fi

# --- 3. slurm.conf -----------------------------------------------------------------------------------
install -d -m 0755 "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
new_conf=$(mktemp)
trap 'rm -f "$new_conf"' EXIT
cat >"$new_conf" <<EOF
# Written by .ci/slurm_up.sh: a one-node cluster on $HOST for tests. Rerun the script to regenerate.
ClusterName=crossrec
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
MailProg=/bin/true
# No cgroups (containers, gVisor): track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Look at pending jobs every 2 s (defaults: 60 s main loop, 30 s backfill), so that a requeued job
# starts again right after its BeginTime (new jobs and freed resources trigger a pass anyway).
SchedulerParameters=sched_interval=2,bf_interval=2
# Jobs may be requeued (preemption: the batch script calls scontrol requeue). A requeued job waits
# cred_expire seconds before it may start again (default 120 s); 10 s keeps tests short.
JobRequeue=1
AuthInfo=cred_expire=10
# A node that went down (daemon restart, reboot) comes back by itself once slurmd registers.
ReturnToService=2
# Finished jobs stay visible to scontrol show job for 10 minutes (no accounting database here).
MinJobAge=600
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
conf_changed=0
if ! cmp -s "$new_conf" "$CONF"; then
    log "writing $CONF (node $HOST, $CPUS CPUs, ${MEM} MB)"
    cp "$new_conf" "$CONF"
    chmod 0644 "$CONF"
    conf_changed=1
fi
# The packaged cgroup.conf (if any) is irrelevant without cgroup plugins; nothing else is needed.

# --- 4. daemons --------------------------------------------------------------------------------------
running() {  # running NAME: the pid in /run/NAME.pid is alive and is NAME
    local pid
    pid=$(cat "/run/$1.pid" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q "$1" "/proc/$pid/comm" 2>/dev/null
}
stop() {  # stop NAME: end the daemon by its pid file (never by name)
    local pid
    pid=$(cat "/run/$1.pid" 2>/dev/null) || return 0
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "/run/$1.pid"
}
if [ "$conf_changed" = 1 ]; then
    stop slurmd
    stop slurmctld
fi
if ! running slurmctld; then
    log "starting slurmctld"
    /usr/sbin/slurmctld || die "slurmctld failed to start; see $LOG_DIR/slurmctld.log"
fi
deadline=$((SECONDS + TIMEOUT))
until scontrol ping 2>/dev/null | grep -q UP || [ "$SECONDS" -ge "$deadline" ]; do sleep 0.2; done
scontrol ping 2>/dev/null | grep -q UP || { tail -20 "$LOG_DIR/slurmctld.log" >&2 || true
                                             die "slurmctld does not answer scontrol ping; see $LOG_DIR/slurmctld.log"; }
if ! running slurmd; then
    log "starting slurmd"
    /usr/sbin/slurmd || die "slurmd failed to start; see $LOG_DIR/slurmd.log"
fi

# --- 5. wait for the node ----------------------------------------------------------------------------
deadline=$((SECONDS + TIMEOUT))
resumed=0
while :; do
    state=$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -1 || true)
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|fail*)
            # e.g. left DOWN by an earlier, unclean shutdown: ReturnToService=2 normally handles it.
            if [ "$resumed" = 0 ] && running slurmd; then
                scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true
                resumed=1
            fi ;;
    esac
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "--- sinfo ---" >&2; sinfo -N -l >&2 || true
        echo "--- scontrol show node ---" >&2; scontrol show node "$HOST" >&2 || true
        echo "--- slurmd.log (tail) ---" >&2; tail -20 "$LOG_DIR/slurmd.log" >&2 || true
        die "node $HOST is '${state:-unknown}', not idle, after ${TIMEOUT}s"
    fi
    sleep 0.5
done
log "cluster up: node $HOST is $state ($(sinfo --version))"
