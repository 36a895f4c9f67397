#!/usr/bin/env bash
# Tear down the test cluster .ci/slurm_up.sh built, as root:  sudo bash .ci/slurm_down.sh
# Cancels nothing by itself: jobs still running are killed with their node. Stops both slurmd and
# slurmctld (by their pid files), kills whatever is left in the node namespaces, deletes the
# namespaces, the veth pairs and the bridge, and removes the cluster's block from /etc/hosts.
# Leaves munged, the packages, /etc/slurm/slurm.conf and the spool/log folders (slurm_up.sh reuses
# them). Idempotent: on a machine without the cluster it does nothing and says so.
set -uo pipefail

BRIDGE=crossrec-br
NODES=(crossrec-n1 crossrec-n2)
log() { echo "slurm_down: $*"; }
[ "$(id -u)" -eq 0 ] || { echo "slurm_down: error: must run as root" >&2; exit 1; }

stop() {  # stop PIDFILE NAME
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 0
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q "$2" "/proc/$pid/comm" 2>/dev/null; then
        log "stopping $2 ($1)"
        kill "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    fi
    rm -f "$1"
}
for node in "${NODES[@]}"; do stop "/run/slurmd-$node.pid" slurmd; done
stop /run/slurmctld.pid slurmctld
for node in "${NODES[@]}"; do
    if [ -e "/run/netns/$node" ]; then
        pids=$(ip netns pids "$node" 2>/dev/null)
        if [ -n "$pids" ]; then
            log "killing what is left on $node: $(echo $pids)"
            # shellcheck disable=SC2086
            kill -9 $pids 2>/dev/null
        fi
        log "deleting namespace $node"
        ip netns del "$node"
    fi
    ip link del "v-${node#crossrec-}" 2>/dev/null && log "deleted veth v-${node#crossrec-}"
done
ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE" && log "deleted bridge $BRIDGE"
if grep -q '^# BEGIN crossrec test cluster' /etc/hosts 2>/dev/null; then
    others=$(sed '/^# BEGIN crossrec test cluster/,/^# END crossrec test cluster/d' /etc/hosts)
    printf '%s\n' "$others" >/etc/hosts && log "removed the cluster's names from /etc/hosts"
fi
log "done"
