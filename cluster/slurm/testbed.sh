#!/usr/bin/env bash
# testbed.sh - a REAL Slurm cluster on this machine, for tests and development (Debian 12 packages,
# Slurm 22.05, no systemd, no cgroups). Run as root.
#
#   cluster/slurm/testbed.sh start    install what is missing (apt-get), write /etc/slurm/*.conf, start munged,
#                                     a private MariaDB, slurmdbd, slurmctld and slurmd; wait until every node
#                                     is idle; exit 0. Idempotent: a healthy cluster with the same knobs is left
#                                     alone; different knobs restart it from scratch.
#   cluster/slurm/testbed.sh stop [--purge]
#                                     cancel every job, stop each daemon by its pid file (never by name);
#                                     --purge also removes $SLURM_BASE and the /etc/hosts lines it added.
#   cluster/slurm/testbed.sh status   print the daemons and sinfo; exit 0 when healthy, 1 otherwise.
#
# Adapted from the recipe checked on this machine (../shared/slurm/start-slurm.sh, stop-slurm.sh); the project
# owns this copy. What matters here (see that recipe's README): proctrack/linuxproc (the cgroup plugins do not
# work in a container), DefMemPerCPU (else every job takes a whole node), SlurmdParameters=config_overrides
# (advertise more CPUs than the machine has), accounting through slurmdbd + MariaDB (submitit reads job states
# with sacct), daemons that do not inherit the lock's file descriptor nor the caller's stdout.
#
# Daemons / ports:  munged (unix socket /run/munge), mariadbd 127.0.0.1:$SLURM_DB_PORT, slurmdbd :6819,
#                   slurmctld :6817, slurmd :6818 (one node) or :6841, :6842, ... (SLURM_NODES>1)
# Config:           /etc/slurm/slurm.conf, gres.conf, slurmdbd.conf (default paths: the clients need no SLURM_CONF)
# State and logs:   $SLURM_BASE (default /tmp/ckd-slurm), wiped on every fresh start
#
# Knobs (environment variables):
#   SLURM_BASE=/tmp/ckd-slurm     state, spool, logs, pid files, MariaDB datadir
#   SLURM_NODES=2                 emulated nodes: N slurmd processes on this machine named node1..nodeN
#                                 (names added to /etc/hosts as 127.0.0.1 when they do not resolve), so
#                                 multi-node jobs (-N 2) run here. 1: one node named after this host.
#   SLURM_NODE_PREFIX=node        node name prefix when SLURM_NODES>1
#   SLURM_NODE_NAME=$(hostname -s) the node name when SLURM_NODES=1 ("localhost" if the hostname does not resolve)
#   SLURM_CPUS=8                  CPUs advertised per node (at least nproc; oversubscribed via config_overrides)
#   SLURM_MEM_MB=<MemTotal-1024>  RealMemory advertised per node
#   SLURM_FAKE_GPUS=4             fake gres/gpu per node (character devices cloned from /dev/null): jobs can ask
#                                 for --gpus-per-node and get CUDA_VISIBLE_DEVICES, nothing computes on them. 0: none
#   SLURM_PARTITION_NAME=debug    the single, default partition
#   SLURM_AUTH=munge              munge | none
#   SLURM_ACCOUNTING=1            1: slurmdbd + MariaDB so sacct works; 0: none (submitit then sees UNKNOWN states)
#   SLURM_DB_PORT=13306           the private MariaDB's port (127.0.0.1)
#   SLURM_START_TIMEOUT=60        seconds to wait for each daemon and for the nodes to become idle
set -euo pipefail

BASE=${SLURM_BASE:-/tmp/ckd-slurm}
AUTH=${SLURM_AUTH:-munge}
ACCOUNTING=${SLURM_ACCOUNTING:-1}
NNODES=${SLURM_NODES:-2}
NPROC=$(nproc)
CPUS=${SLURM_CPUS:-8}; (( CPUS < NPROC )) && CPUS=$NPROC
MEM_MB=${SLURM_MEM_MB:-$(( $(awk '/^MemTotal:/{print int($2/1024)}' /proc/meminfo) - 1024 ))}
GPUS=${SLURM_FAKE_GPUS:-4}
PARTITION=${SLURM_PARTITION_NAME:-debug}
DB_PORT=${SLURM_DB_PORT:-13306}
TIMEOUT=${SLURM_START_TIMEOUT:-60}
CONF=/etc/slurm
LOCK=/tmp/.ckd-slurm-testbed.lock
HOSTS_MARK='# added by ckd cluster/slurm/testbed.sh'

if (( NNODES > 1 )); then
  PREFIX=${SLURM_NODE_PREFIX:-node}
  NODES=(); for ((i = 1; i <= NNODES; i++)); do NODES+=("$PREFIX$i"); done
  NODESPEC="${PREFIX}[1-$NNODES]"
else
  NODE=${SLURM_NODE_NAME:-$(hostname -s)}
  # jobs see the node name (SLURMD_NODENAME, SLURM_JOB_NODELIST) and resolve it: it must resolve
  if [ -z "${SLURM_NODE_NAME:-}" ] && ! getent hosts "$NODE" >/dev/null 2>&1; then NODE=localhost; fi
  NODES=("$NODE"); NODESPEC=$NODE
fi
if (( GPUS > 0 )) && [ "${1:-}" = start ]; then  # fake GPUs need mknod (refused in some containers)
  probe=$(mktemp -u /tmp/.ckd-slurm-mknod.XXXXXX)
  if mknod "$probe" c 1 3 2>/dev/null; then rm -f "$probe"; else
    echo "[testbed] mknod is not permitted here: starting without fake GPUs (SLURM_FAKE_GPUS=0)" >&2; GPUS=0
  fi
fi
KNOBS="auth=$AUTH accounting=$ACCOUNTING nodes=$NODESPEC cpus=$CPUS mem=$MEM_MB gpus=$GPUS partition=$PARTITION dbport=$DB_PORT"

log() { printf '[testbed %(%H:%M:%S)T] %s\n' -1 "$*"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}'; }
die() {
  log "ERROR: $*"
  for f in "$BASE"/log/*.log "$BASE"/mysql-run/mariadb.log; do [ -f "$f" ] && { echo "--- tail $f"; tail -n 15 "$f"; }; done
  exit 1
}
pid_of() { [ -s "$1" ] && cat "$1" 2>/dev/null; }
# a zombie (not yet reaped by PID 1) counts as stopped
alive_pid() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
alive() { alive_pid "$(pid_of "$1")"; }
# wait_for <description> <command...>: retry every 0.2 s until it succeeds or TIMEOUT passes
wait_for() {
  local what=$1; shift; local end=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    (( SECONDS < end )) || die "timed out after ${TIMEOUT}s waiting for $what"
    sleep 0.2
  done
}
node_states() { sinfo -h -N -n "$NODESPEC" -o %T 2>/dev/null; }
node_ok() { [ "$(node_states | grep -cxE 'idle|mixed|allocated|completing')" = "$NNODES" ]; }
node_idle() { [ "$(node_states | grep -cx idle)" = "$NNODES" ]; }
listening() { ss -Hltn 2>/dev/null | awk '{print $4}' | grep -qE ":$1\$"; }

healthy() {  # [--any-knobs]: do not compare the knobs the cluster was started with
  command -v sinfo >/dev/null || return 1
  alive "$BASE/run/slurmctld.pid" || return 1
  local n; for n in "${NODES[@]}"; do alive "$BASE/run/slurmd-$n.pid" || return 1; done
  if [ "$ACCOUNTING" = 1 ]; then alive "$BASE/run/slurmdbd.pid" && alive "$BASE/run/mysqld.pid" || return 1; fi
  [ -f "$CONF/slurm.conf" ] || return 1
  if [ "${1:-}" != --any-knobs ] && [ "$(cat "$BASE/run/knobs" 2>/dev/null)" != "$KNOBS" ]; then return 1; fi
  node_ok
}

lock() {  # serialize start/stop; every daemon is started with 9>&- so that none keeps the lock
  exec 9>"$LOCK"; flock -w 300 9 || { echo "could not lock $LOCK within 300 s" >&2; exit 1; }
}

# ================================================================================================= stop
stop_pidfile() {  # <name> <pidfile>: SIGTERM, up to 15 s, then SIGKILL
  local name=$1 pid; pid=$(pid_of "$2") || { log "$name: not running (no pid file)"; return 0; }
  alive_pid "$pid" || { log "$name: not running (stale pid $pid)"; rm -f "$2"; return 0; }
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 1 75); do alive_pid "$pid" || break; sleep 0.2; done
  if alive_pid "$pid"; then log "$name: still alive after 15 s, SIGKILL $pid"; kill -KILL "$pid" 2>/dev/null; sleep 0.5; fi
  rm -f "$2"   # a pid file may outlive its daemon (mysqld's is a symlink)
  log "$name: stopped (pid $pid)"
}

do_stop() {  # [--purge]
  local purge=0; [ "${1:-}" = --purge ] && purge=1
  # 1. cancel every job, so that slurmd ends the job steps itself
  if alive "$BASE/run/slurmctld.pid" && command -v squeue >/dev/null; then
    local ids; ids=$(squeue -h -o %A 2>/dev/null | sort -u)
    if [ -n "$ids" ]; then
      log "cancelling jobs: ${ids//$'\n'/ }"
      # shellcheck disable=SC2086
      scancel $ids 2>/dev/null || true
      for _ in $(seq 1 75); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
    fi
  fi
  # 2. the daemons, in reverse start order
  local f n
  for f in "$BASE"/run/slurmd-*.pid; do
    [ -e "$f" ] || continue; n=${f##*/slurmd-}; stop_pidfile "slurmd ${n%.pid}" "$f"
  done
  stop_pidfile slurmctld "$BASE/run/slurmctld.pid"
  stop_pidfile slurmdbd "$BASE/run/slurmdbd.pid"
  stop_pidfile mariadbd "$BASE/run/mysqld.pid"
  # munged only if this script started it (it copies munged's pid file into $BASE/run)
  if [ -s "$BASE/run/munged.pid" ]; then
    if [ "$(pid_of /run/munge/munged.pid)" = "$(pid_of "$BASE/run/munged.pid")" ]; then
      stop_pidfile munged "$BASE/run/munged.pid"
    else
      rm -f "$BASE/run/munged.pid"
    fi
  fi
  local left; left=$(ss -Hltn 2>/dev/null | awk '{print $4}' | grep -E ':(6817|6818|6819|684[0-9])$' || true)
  [ -n "$left" ] && log "WARNING: still listening: ${left//$'\n'/ }"
  if (( purge )); then
    rm -rf "$BASE"; log "removed $BASE"
    if grep -q "$HOSTS_MARK\$" /etc/hosts 2>/dev/null; then  # rewrite in place: /etc/hosts may be a bind mount
      local h; h=$(grep -v "$HOSTS_MARK\$" /etc/hosts); printf '%s\n' "$h" > /etc/hosts; log "cleaned /etc/hosts"
    fi
  fi
}

# ================================================================================================ start
install_packages() {
  local pkgs=()
  command -v slurmctld >/dev/null || pkgs+=(slurmctld)
  command -v slurmd >/dev/null || pkgs+=(slurmd)
  command -v sbatch >/dev/null || pkgs+=(slurm-client)
  if [ "$AUTH" = munge ]; then command -v munged >/dev/null || pkgs+=(munge); fi
  if [ "$ACCOUNTING" = 1 ]; then
    command -v slurmdbd >/dev/null || pkgs+=(slurmdbd)
    [ -x /usr/sbin/mariadbd ] || pkgs+=(mariadb-server)
  fi
  (( ${#pkgs[@]} )) || return 0
  local t=$EPOCHREALTIME made_policy=0
  log "installing: ${pkgs[*]}"
  # keep the packages' maintainer scripts from starting system services
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || { (( made_policy )) && rm -f /usr/sbin/policy-rc.d; die "apt-get update failed"; }
  if ! apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >"/tmp/.ckd-slurm-apt.log" 2>&1; then
    (( made_policy )) && rm -f /usr/sbin/policy-rc.d
    tail -n 20 /tmp/.ckd-slurm-apt.log; die "apt-get install ${pkgs[*]} failed"
  fi
  (( made_policy )) && rm -f /usr/sbin/policy-rc.d
  log "installed in $(since "$t")s"
}

write_slurm_conf() {
  local gres_node="" gres_types="" acct i
  : > "$CONF/gres.conf"
  if (( GPUS > 0 )); then
    for ((i = 0; i < GPUS; i++)); do
      # Slurm only counts character/block devices: clones of /dev/null (major 1, minor 3)
      mknod "$BASE/gpu/nvidia$i" c 1 3
    done
    printf 'AutoDetect=off\nNodeName=%s Name=gpu File=%s/gpu/nvidia[0-%d]\n' "$NODESPEC" "$BASE" $((GPUS - 1)) > "$CONF/gres.conf"
    gres_node="Gres=gpu:$GPUS"; gres_types="GresTypes=gpu"
  fi
  if [ "$ACCOUNTING" = 1 ]; then
    acct=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\nAccountingStoragePort=6819\nJobAcctGatherType=jobacct_gather/linux'
  else
    acct=$'AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none'
  fi
  cat > "$CONF/slurm.conf" <<EOF
# generated by cluster/slurm/testbed.sh - emulated nodes on one machine, no systemd, no cgroups
ClusterName=ckdtest
# "localhost" is accepted as the controller name whatever the machine's hostname is
SlurmctldHost=localhost
AuthType=auth/$AUTH
CredType=cred/$AUTH
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$BASE/state
# %n = node name, so that several slurmd share this machine
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
MailProg=/bin/true
# the cgroup plugins fail here (proctrack/cgroup: "cgroup namespace 'freezer' not mounted")
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$acct
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default every job would get the whole node's memory and jobs would run one at a time
DefMemPerCPU=1024
# lets a node advertise more CPUs and memory than the hardware has
SlurmdParameters=config_overrides
$gres_types
ReturnToService=2
SchedulerType=sched/backfill
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
EOF
  if (( NNODES == 1 )); then
    echo "NodeName=${NODES[0]} NodeAddr=127.0.0.1 Port=6818 CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB $gres_node State=UNKNOWN" >> "$CONF/slurm.conf"
  else
    for ((i = 1; i <= NNODES; i++)); do
      echo "NodeName=${NODES[i-1]} NodeAddr=127.0.0.1 Port=$((6840 + i)) CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB $gres_node State=UNKNOWN" >> "$CONF/slurm.conf"
      # jobs resolve the node names (the Ray head's address, MASTER_ADDR)
      getent hosts "${NODES[i-1]}" >/dev/null 2>&1 || echo "127.0.0.1 ${NODES[i-1]}  $HOSTS_MARK" >> /etc/hosts
    done
  fi
  echo "PartitionName=$PARTITION Nodes=$NODESPEC Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO" >> "$CONF/slurm.conf"
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running (not managed by this script)"; return 0
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    install -d -o munge -g munge -m 0700 /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key --force
  fi
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1 9>&-   # daemonizes; pid in /run/munge/munged.pid
  wait_for munged sh -c 'munge -n </dev/null | unmunge'
  cp /run/munge/munged.pid "$BASE/run/munged.pid" 2>/dev/null || true
  log "munged up"
}

start_accounting() {
  mkdir -p "$BASE/mysql" "$BASE/mysql-run"; chown mysql:mysql "$BASE/mysql" "$BASE/mysql-run"
  mariadb-install-db --no-defaults --user=mysql --datadir="$BASE/mysql" \
      --auth-root-authentication-method=socket --skip-test-db >"$BASE/log/mariadb-install.log" 2>&1 \
    || die "mariadb-install-db failed (see $BASE/log/mariadb-install.log)"
  local sock=$BASE/mysql-run/mysqld.sock
  setsid -f /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$BASE/mysql" \
      --socket="$sock" --pid-file="$BASE/mysql-run/mysqld.pid" --bind-address=127.0.0.1 --port="$DB_PORT" \
      --skip-name-resolve --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
      --log-error="$BASE/mysql-run/mariadb.log" </dev/null >/dev/null 2>&1 9>&-
  wait_for mariadbd mariadb-admin --no-defaults --socket="$sock" ping
  ln -sf "$BASE/mysql-run/mysqld.pid" "$BASE/run/mysqld.pid"
  mariadb --no-defaults --socket="$sock" -uroot -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  log "mariadbd up on 127.0.0.1:$DB_PORT"
  cat > "$CONF/slurmdbd.conf" <<EOF
AuthType=auth/$AUTH
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$BASE/run/slurmdbd.pid
LogFile=$BASE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$CONF/slurmdbd.conf"   # slurmdbd refuses it unless mode 600 and owned by SlurmUser (root)
  slurmdbd </dev/null >/dev/null 2>&1 9>&-
  wait_for slurmdbd sacctmgr -n -P list cluster
  log "slurmdbd up"
}

do_start() {
  if healthy; then
    log "Slurm already running and healthy (nodes $NODESPEC: $(node_states | sort -u | paste -sd, -)); nothing to do"
    return 0
  fi
  local t_start=$EPOCHREALTIME
  install_packages
  do_stop >/dev/null   # leftovers of an earlier start of this script
  local port
  for port in 6817 6819 "$DB_PORT"; do
    if listening "$port"; then
      die "port $port is in use by a Slurm or MariaDB this script did not start (another testbed or the shared \
recipe?); stop it first: $(ss -Hltnp 2>/dev/null | awk -v p=":$port\$" '$4 ~ p {print $6}')"
    fi
  done
  rm -rf "$BASE"
  mkdir -p "$BASE"/{state,spool,log,run,gpu} "$CONF"
  local n; for n in "${NODES[@]}"; do mkdir -p "$BASE/spool/$n"; done
  echo "$KNOBS" > "$BASE/run/knobs"   # a later start with other knobs restarts the cluster
  local t_daemons=$EPOCHREALTIME
  write_slurm_conf
  [ "$AUTH" = munge ] && start_munge
  [ "$ACCOUNTING" = 1 ] && start_accounting
  local t_ctld=$EPOCHREALTIME
  slurmctld </dev/null >/dev/null 2>&1 9>&-   # registers the cluster in slurmdbd by itself
  for n in "${NODES[@]}"; do
    slurmd -N "$n" </dev/null >/dev/null 2>&1 9>&-   # -N: the node name, independent of the hostname
  done
  wait_for "node(s) $NODESPEC to become idle" node_idle
  log "node(s) $NODESPEC idle: $(since "$t_ctld")s after starting slurmctld+slurmd," \
      "$(since "$t_daemons")s for all daemons, $(since "$t_start")s in total"
  sinfo -N -o '%N %P %T %c %m %G'
}

do_status() {
  local ok=0
  healthy --any-knobs || ok=1
  local f
  for f in slurmctld slurmdbd mysqld munged; do
    if alive "$BASE/run/$f.pid"; then echo "$f: running (pid $(pid_of "$BASE/run/$f.pid"))"; else echo "$f: not running"; fi
  done
  for f in "${NODES[@]}"; do
    if alive "$BASE/run/slurmd-$f.pid"; then echo "slurmd $f: running"; else echo "slurmd $f: not running"; fi
  done
  if command -v sinfo >/dev/null; then sinfo -N -o '%N %P %T %c %m %G' 2>/dev/null || true; fi
  local knobs; knobs=$(cat "$BASE/run/knobs" 2>/dev/null || echo "none recorded")
  if (( ok == 0 )); then echo "healthy ($knobs)"; else echo "not healthy (started with: $knobs)"; fi
  return $ok
}

cmd=${1:-}
case "$cmd" in
  start|stop) [ "$(id -u)" = 0 ] || { echo "testbed.sh $cmd: must run as root" >&2; exit 1; } ;;
esac
case "$AUTH" in munge|none) ;; *) echo "SLURM_AUTH must be munge or none" >&2; exit 1;; esac
case "$cmd" in
  start) lock; do_start ;;
  stop) lock; shift; do_stop "$@" ;;
  status) do_status ;;
  *) echo "usage: $0 start | stop [--purge] | status" >&2; exit 2 ;;
esac
