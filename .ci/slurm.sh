#!/usr/bin/env bash
# A real single-node SLURM on this machine, for the `slurm` tests (tests/test_slurm.py):
#   .ci/slurm.sh start   install (Debian packages, once) and start munged, mariadbd, slurmdbd,
#                        slurmctld and slurmd; prints the setup time. Idempotent: a running
#                        cluster is left as it is.
#   .ci/slurm.sh stop    stop every daemon it started, by the PIDs it recorded.
#   .ci/slurm.sh status  exit 0 when the cluster answers.
# Needs root and apt-get (no systemd: the packages' start steps are refused, the daemons are
# started here by hand). One node with this machine's CPUs and memory, one default partition
# `main`, slurmdbd accounting (submitit polls sacct, which answers only with it).
set -euo pipefail
STATE=${STEDM_SLURM_STATE:-/var/lib/stedm-slurm}
PIDS=$STATE/pids
HOST=$(hostname -s)

log() { echo "slurm.sh: $*" >&2; }

running() {  # the recorded daemons all alive and the controller answering
    [ -f "$PIDS" ] || return 1
    while read -r name pid; do kill -0 "$pid" 2>/dev/null || return 1; done < "$PIDS"
    sinfo -h >/dev/null 2>&1
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2; shift 2
    for _ in $(seq $((limit * 4))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
    log "$what did not come up within ${limit}s; logs in $STATE"; return 1
}

pid_of() { cat "$1" 2>/dev/null || true; }

install() {
    command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null \
        && command -v munged >/dev/null && return 0
    [ "$(id -u)" = 0 ] || { log "needs root to install slurm-wlm"; exit 2; }
    command -v apt-get >/dev/null || { log "needs apt-get (Debian packages)"; exit 2; }
    log "installing slurm-wlm munge slurmdbd mariadb-server"
    apt-get update -qq >/dev/null
    # The packages try to start their services (invoke-rc.d); that is refused here, harmlessly.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge slurmdbd mariadb-server >/dev/null 2>&1 \
        || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge slurmdbd mariadb-server
}

configure() {
    mkdir -p "$STATE"/{ctld,d,mysql} /etc/slurm /run/munge /run/mysqld
    chown munge:munge /run/munge; chown mysql:mysql /run/mysqld
    [ -s /etc/munge/munge.key ] || { mungekey --create --force >/dev/null 2>&1 || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    local cpus mem
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))  # MB, leaving 1 GB to the system
    cat > /etc/slurm/slurm.conf <<EOF
# written by .ci/slurm.sh
ClusterName=stedm
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
MailProg=/bin/true
MpiDefault=none
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
KillWait=10
MinJobAge=600
InactiveLimit=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat > /etc/slurm/slurmdbd.conf <<EOF
# written by .ci/slurm.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=stedm-ci
StorageLoc=slurm_acct_db
EOF
    chmod 600 /etc/slurm/slurmdbd.conf
}

start() {
    local t0=$SECONDS
    if running; then log "already running"; return 0; fi
    stop quiet
    install
    configure
    : > "$PIDS"
    # munged, as the munge user
    su -s /bin/sh munge -c "/usr/sbin/munged --force --pid-file=/run/munge/munged.pid" 
    wait_for 10 munged test -S /run/munge/munge.socket.2
    echo "munged $(pid_of /run/munge/munged.pid)" >> "$PIDS"
    # mariadbd, and the accounting database
    mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
        --pid-file=/run/mysqld/mysqld.pid --skip-networking=0 --bind-address=127.0.0.1 \
        > "$STATE/mariadbd.log" 2>&1 &
    wait_for 30 mariadbd mariadb -u root -e "select 1"
    echo "mariadbd $(pid_of /run/mysqld/mysqld.pid)" >> "$PIDS"
    mariadb -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'stedm-ci';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
    slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
    echo "slurmdbd $(pid_of "$STATE/slurmdbd.pid")" >> "$PIDS"
    sacctmgr -i add cluster stedm >/dev/null 2>&1 || true
    slurmctld
    wait_for 30 slurmctld scontrol ping
    echo "slurmctld $(pid_of "$STATE/slurmctld.pid")" >> "$PIDS"
    slurmd
    wait_for 30 slurmd sh -c "sinfo -h -N -o %t | grep -qE '^(idle|mix|alloc)'"
    echo "slurmd $(pid_of "$STATE/slurmd.pid")" >> "$PIDS"
    log "cluster up in $((SECONDS - t0))s: $(sinfo -h -N -o '%N %c CPUs %m MB %t')"
}

stop() {
    [ -f "$PIDS" ] || { [ "${1:-}" = quiet ] || log "no cluster recorded in $PIDS"; return 0; }
    # the reverse order of starting: slurmd, slurmctld, slurmdbd, mariadbd, munged
    tac "$PIDS" | while read -r name pid; do
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
            [ "${1:-}" = quiet ] || log "stopped $name ($pid)"
        fi
    done
    rm -f "$PIDS"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) running ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
