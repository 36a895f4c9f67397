#!/usr/bin/env bash
# Bring up a two-node Slurm cluster on this one machine (CI, a laptop, a fresh VM), as root:
#   sudo bash .ci/slurm_up.sh          # tear it down: sudo bash .ci/slurm_down.sh
#
# Two compute nodes, crossrec-n1 and crossrec-n2, each a network namespace of its own (same name)
# with its own address (SUBNET.11, SUBNET.12) on a veth pair plugged into a bridge (crossrec-br,
# SUBNET.1), and its own hostname (a UTS namespace). Each runs its own slurmd, so a job step placed on
# n2 really starts there and reaches n1 over an interface, not over loopback. slurmctld runs in the
# host's namespace, reachable on the bridge address. The filesystem is shared (one machine): the
# repository is at the same path on both nodes, as on a cluster with a shared filesystem.
#
# Installs Debian's slurm-wlm + munge (and iproute2) when missing, writes /etc/slurm/slurm.conf, adds
# the names to /etc/hosts (one marked block), creates the munge key, starts munged, slurmctld and the
# two slurmd without systemd, and waits until `sinfo` shows both nodes up. Idempotent: on a running
# cluster it only checks (about a second); after a reboot or dead daemons it rebuilds what is missing.
# Exits non-zero with a message saying what failed.
#
# Knobs (environment): SLURM_CPUS per node (2), SLURM_MEM_MB per node (4000), SLURM_PARTITION (debug),
# SLURM_SUBNET (10.77.0: three octets, a /24 nothing else on the machine uses), SLURM_UP_TIMEOUT
# seconds to wait for the controller, then for each node (60).
set -euo pipefail

CPUS=${SLURM_CPUS:-2}
MEM=${SLURM_MEM_MB:-4000}
PARTITION=${SLURM_PARTITION:-debug}
TIMEOUT=${SLURM_UP_TIMEOUT:-60}
SUBNET=${SLURM_SUBNET:-10.77.0}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
BRIDGE=crossrec-br
CTL_ADDR=$SUBNET.1
NODES=(crossrec-n1 crossrec-n2)
node_addr() { echo "$SUBNET.$((10 + ${1#crossrec-n}))"; }   # crossrec-nK -> SUBNET.(10+K)

die() { echo "slurm_up: error: $*" >&2; exit 1; }
# `cmd | grep -q` is wrong under pipefail: grep exits at its first match and a command still writing
# (ip writes one line per call) dies of SIGPIPE, so the pipeline "fails" on a match. Capture instead.
prints() { local pattern=$1 out; shift; out=$("$@" 2>/dev/null) || true; [[ $out == *"$pattern"* ]]; }
log() { echo "slurm_up: $*"; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages, makes network namespaces, starts daemons)"
HOST=$(hostname -s) || die "hostname -s failed"     # slurmctld only runs where SlurmctldHost names this host
[ -n "$HOST" ] || die "empty hostname"

# --- 1. packages -------------------------------------------------------------------------------------
need_install=0
for bin in slurmctld slurmd sbatch srun scontrol sinfo munged munge ip unshare; do
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
    apt_install() { apt-get install -y -q --no-install-recommends slurm-wlm munge iproute2 util-linux >/tmp/slurm_up_apt.log 2>&1; }
    if ! apt_install; then
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update -q >>/tmp/slurm_up_apt.log 2>&1 || true
        apt_install || { [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d; tail -20 /tmp/slurm_up_apt.log >&2
                     die "apt-get install slurm-wlm munge failed (log: /tmp/slurm_up_apt.log)"; }
    fi
    [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    for bin in slurmctld slurmd sbatch munged ip unshare; do
        command -v "$bin" >/dev/null 2>&1 || die "$bin still missing after installing slurm-wlm munge iproute2"
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

# --- 3. network: a bridge on the host, one namespace per node ----------------------------------------
if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    log "creating bridge $BRIDGE ($CTL_ADDR/24)"
    ip link add "$BRIDGE" type bridge || die "cannot create bridge $BRIDGE (ip link add ... type bridge)"
fi
prints "inet $CTL_ADDR/24" ip addr show dev "$BRIDGE" || ip addr add "$CTL_ADDR/24" dev "$BRIDGE" \
    || die "cannot give $BRIDGE the address $CTL_ADDR/24 (is $SUBNET.0/24 taken here? set SLURM_SUBNET)"
ip link set "$BRIDGE" up
for node in "${NODES[@]}"; do
    addr=$(node_addr "$node")
    veth=v-${node#crossrec-}          # the host's end of the node's cable (names: at most 15 characters)
    if ! ip netns exec "$node" true 2>/dev/null; then
        ip netns del "$node" 2>/dev/null || true
        log "creating network namespace $node ($addr)"
        ip netns add "$node" || die "ip netns add $node failed"
    fi
    if ! ip netns exec "$node" ip link show eth0 >/dev/null 2>&1; then
        ip link del "$veth" 2>/dev/null || true
        ip link add "$veth" type veth peer name "$veth-p" || die "cannot create the veth pair $veth"
        ip link set "$veth-p" netns "$node" || die "cannot move $veth-p into namespace $node"
        ip netns exec "$node" ip link set "$veth-p" name eth0
    fi
    ip link set "$veth" master "$BRIDGE" && ip link set "$veth" up || die "cannot plug $veth into $BRIDGE"
    ip netns exec "$node" ip link set lo up
    prints "inet $addr/24" ip netns exec "$node" ip addr show dev eth0 \
        || ip netns exec "$node" ip addr add "$addr/24" dev eth0 || die "cannot give eth0 in $node the address $addr"
    ip netns exec "$node" ip link set eth0 up
done

# Names: the controller and both nodes resolve through /etc/hosts (shared by every namespace), one block.
hosts_block="# BEGIN crossrec test cluster (.ci/slurm_up.sh)"
for node in "${NODES[@]}"; do hosts_block+=$'\n'"$(node_addr "$node") $node"; done
hosts_block+=$'\n'"# END crossrec test cluster"
if [ "$(sed -n '/^# BEGIN crossrec test cluster/,/^# END crossrec test cluster/p' /etc/hosts)" != "$hosts_block" ]; then
    log "adding the cluster's names to /etc/hosts"
    others=$(sed '/^# BEGIN crossrec test cluster/,/^# END crossrec test cluster/d' /etc/hosts)
    # Written in place, not renamed over: in a container /etc/hosts is often a bind mount.
    printf '%s\n%s\n' "$others" "$hosts_block" >/etc/hosts || die "cannot write /etc/hosts"
fi
for node in "${NODES[@]}"; do
    [ "$(getent hosts "$node" | awk '{print $1}')" = "$(node_addr "$node")" ] \
        || die "$node does not resolve to $(node_addr "$node") (getent hosts $node); check /etc/hosts and nsswitch.conf"
done

# --- 4. slurm.conf -----------------------------------------------------------------------------------
install -d -m 0755 "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld
for node in "${NODES[@]}"; do install -d -m 0755 "/var/spool/slurmd/$node"; done
new_conf=$(mktemp)
trap 'rm -f "$new_conf"' EXIT
{
cat <<EOF
# Written by .ci/slurm_up.sh: a two-node test cluster on one machine (each node a network namespace
# with its own hostname). Rerun the script to regenerate; .ci/slurm_down.sh tears it down.
ClusterName=crossrec
SlurmctldHost=$HOST($CTL_ADDR)
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
# Two slurmd on one machine: each its own spool, pid file and log (%n: the node's name).
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
EOF
for node in "${NODES[@]}"; do
    echo "NodeName=$node NodeAddr=$(node_addr "$node") CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
done
echo "PartitionName=$PARTITION Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
} >"$new_conf"
conf_changed=0
if ! cmp -s "$new_conf" "$CONF"; then
    log "writing $CONF (nodes ${NODES[*]}, $CPUS CPUs and ${MEM} MB each)"
    cp "$new_conf" "$CONF"
    chmod 0644 "$CONF"
    conf_changed=1
fi
# The packaged cgroup.conf (if any) is irrelevant without cgroup plugins; nothing else is needed.

# --- 5. daemons --------------------------------------------------------------------------------------
running() {  # running PIDFILE NAME: the pid in PIDFILE is alive and is NAME
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q "$2" "/proc/$pid/comm" 2>/dev/null
}
stop() {  # stop PIDFILE NAME: end the daemon by its pid file (never by name alone)
    if running "$1" "$2"; then
        local pid
        pid=$(cat "$1")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "$1"
}
if [ "$conf_changed" = 1 ]; then
    stop /run/slurmd.pid slurmd      # the one-node cluster an earlier version of this script wrote
    for node in "${NODES[@]}"; do stop "/run/slurmd-$node.pid" slurmd; done
    stop /run/slurmctld.pid slurmctld
fi
if ! running /run/slurmctld.pid slurmctld; then
    log "starting slurmctld"
    /usr/sbin/slurmctld || die "slurmctld failed to start; see $LOG_DIR/slurmctld.log"
fi
deadline=$((SECONDS + TIMEOUT))
until prints UP scontrol ping || [ "$SECONDS" -ge "$deadline" ]; do
    running /run/slurmctld.pid slurmctld || { sleep 1; running /run/slurmctld.pid slurmctld; } || break   # it died
    sleep 0.2
done
prints UP scontrol ping || { tail -20 "$LOG_DIR/slurmctld.log" >&2 || true
                                             die "slurmctld does not answer scontrol ping; see $LOG_DIR/slurmctld.log"; }
for node in "${NODES[@]}"; do
    if ! running "/run/slurmd-$node.pid" slurmd; then
        log "starting slurmd on $node (its namespace, its hostname)"
        # slurmd finds its NodeName by hostname; every process of a job on this node (slurmstepd's
        # children) inherits the network and the hostname. nsenter, not `ip netns exec`: that one also
        # mounts a fresh /sys without /sys/fs/cgroup, and slurmd refuses to start without it.
        nsenter --net="/run/netns/$node" unshare --uts -- sh -c "hostname $node && exec /usr/sbin/slurmd" \
            || die "slurmd failed to start on $node; see $LOG_DIR/slurmd-$node.log"
    fi
done

# --- 6. wait for the nodes ---------------------------------------------------------------------------
for node in "${NODES[@]}"; do
    deadline=$((SECONDS + TIMEOUT))
    resumed=0
    while :; do
        state=$(sinfo -h -N -n "$node" -o %T 2>/dev/null | head -1 || true)
        case "$state" in
            idle|mixed|allocated|completing) break ;;
            down*|drain*|fail*)
                # e.g. left DOWN by an earlier, unclean shutdown: ReturnToService=2 normally handles it.
                if [ "$resumed" = 0 ] && running "/run/slurmd-$node.pid" slurmd; then
                    scontrol update NodeName="$node" State=RESUME 2>/dev/null || true
                    resumed=1
                fi ;;
        esac
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "--- sinfo ---" >&2; sinfo -N -l >&2 || true
            echo "--- scontrol show node $node ---" >&2; scontrol show node "$node" >&2 || true
            echo "--- slurmd-$node.log (tail) ---" >&2; tail -20 "$LOG_DIR/slurmd-$node.log" >&2 || true
            die "node $node is '${state:-unknown}', not idle, after ${TIMEOUT}s"
        fi
        sleep 0.5
    done
done
log "cluster up: ${NODES[*]} ($(sinfo -h -o %T | sort -u | paste -sd,)), controller $HOST $CTL_ADDR ($(sinfo --version))"
