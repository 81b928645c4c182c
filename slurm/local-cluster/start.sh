#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests, CI and development:
# munged, a private MariaDB + slurmdbd (accounting), slurmctld and slurmd, all on loopback, state under one folder.
#
#   bash slurm/local-cluster/start.sh     # idempotent: installs what is missing, starts what is not running
#   bash slurm/local-cluster/stop.sh      # stops what this script started (by pid file); --purge drops the state
#
# Knobs (environment): SLURM_LOCAL_DIR (/tmp/slurm-local), SLURM_LOCAL_ACCOUNTING (1; 0 skips MariaDB+slurmdbd,
# but then submitit never notices a job that died without a result), SLURM_LOCAL_CPUS (nproc),
# SLURM_LOCAL_MEM_MB (85% of RAM), SLURM_LOCAL_DB_PORT (3307), SLURM_LOCAL_WAIT (60 s per wait).
#
# Written for Debian 12 without systemd (containers, CI): the packages' postinst scripts start nothing, so every
# daemon is started here by hand and tracked by its pid file under $SLURM_LOCAL_DIR/pids.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  exec sudo --preserve-env=SLURM_LOCAL_DIR,SLURM_LOCAL_ACCOUNTING,SLURM_LOCAL_CPUS,SLURM_LOCAL_MEM_MB,SLURM_LOCAL_DB_PORT,SLURM_LOCAL_WAIT \
    bash "$0" "$@"
fi

DIR="${SLURM_LOCAL_DIR:-/tmp/slurm-local}"
ACCOUNTING="${SLURM_LOCAL_ACCOUNTING:-1}"
CPUS="${SLURM_LOCAL_CPUS:-$(nproc)}"
MEM_MB="${SLURM_LOCAL_MEM_MB:-$(awk '/^MemTotal:/ {print int($2 * 0.85 / 1024)}' /proc/meminfo)}"
DB_PORT="${SLURM_LOCAL_DB_PORT:-3307}"
WAIT="${SLURM_LOCAL_WAIT:-60}"
CONF_DIR=/etc/slurm          # Debian's compiled-in default: sinfo, sbatch and submitit then need no SLURM_CONF
CLUSTER=localcluster
PIDS="$DIR/pids"
MARK="# written by raddino-bench slurm/local-cluster/start.sh"
t0=$(date +%s.%N)

say() { echo "local-cluster: $*"; }
die() { echo "local-cluster: error: $*" >&2; exit 1; }

# wait_for SECONDS WHAT CMD...: retry CMD every 0.2 s until it succeeds, or fail naming WHAT and the log to read.
wait_for() {
  local seconds=$1 what=$2; shift 2
  local deadline=$(( $(date +%s) + seconds ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || die "$what did not come up within ${seconds} s (see $DIR/log/)"
    sleep 0.2
  done
}

# running NAME: the process recorded in $PIDS/NAME.pid is alive and is still that program (pids get reused).
running() {
  local f="$PIDS/$1.pid" pid
  [ -s "$f" ] || return 1
  pid=$(head -n1 "$f")
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

# ---------------------------------------------------------------------------------------------------------------
# 1. Packages: only the missing ones, with `apt-get update` only then. Individual packages, no recommends
#    (the slurm-wlm metapackage would bring 43 packages).
packages=(slurmctld slurmd slurm-client munge)
[ "$ACCOUNTING" = 1 ] && packages+=(slurmdbd mariadb-server)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

mkdir -p "$DIR"/{state,spool,log} "$PIDS"
chmod 755 "$DIR"

# ---------------------------------------------------------------------------------------------------------------
# 2. munge. Its runtime dir is normally made by systemd-tmpfiles, and munged refuses to run as root.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 755 /run/munge
  touch "$PIDS/munged.pid" && chown munge:munge "$PIDS/munged.pid"
  runuser -u munge -- munged --pid-file="$PIDS/munged.pid"
  wait_for "$WAIT" munged sh -c 'munge -n | unmunge'
fi

# ---------------------------------------------------------------------------------------------------------------
# 3. Configuration, replaced only when its content changes; the running daemons then restart to read it.
slurm_conf="$MARK
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds before it may start again (default 120): the tests requeue.
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job without --mem gets its share of the memory per CPU, not the whole node (which would run jobs one by one).
DefMemPerCPU=$(( MEM_MB / CPUS ))
ReturnToService=2
KillWait=5
# Listen on 127.0.0.1 only (slurmdbd 22.05 has no such option; it is munge-authenticated and only slurmctld,
# over loopback, talks to it).
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd.pid
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/linux"
if [ "$ACCOUNTING" = 1 ]; then
  slurm_conf+="
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
fi
# The node is called localhost whatever the hostname is; slurmd is started with -N localhost to match.
slurm_conf+="
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP"

db_pass=slurm-local   # a private database on 127.0.0.1 that only slurmdbd uses
dbd_conf="$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$PIDS/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$db_pass
StorageLoc=slurm_acct_db"

# write_if_changed FILE MODE CONTENT: atomic replace; returns 0 when the file changed.
write_if_changed() {
  local file=$1 mode=$2 content=$3
  if [ -f "$file" ] && [ "$(cat "$file")" = "$content" ]; then return 1; fi
  mkdir -p "$(dirname "$file")"
  printf '%s\n' "$content" > "$file.tmp.$$"
  chmod "$mode" "$file.tmp.$$"
  mv -f "$file.tmp.$$" "$file"
}

changed=0
write_if_changed "$CONF_DIR/slurm.conf" 644 "$slurm_conf" && changed=1
if [ "$ACCOUNTING" = 1 ]; then
  write_if_changed "$CONF_DIR/slurmdbd.conf" 600 "$dbd_conf" && changed=1
fi
if [ "$changed" = 1 ]; then
  for d in slurmd slurmctld slurmdbd; do
    if running "$d"; then
      say "configuration changed: restarting $d"
      pid=$(head -n1 "$PIDS/$d.pid"); kill "$pid"
      for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    fi
  done
fi

# ---------------------------------------------------------------------------------------------------------------
# 4. Accounting: a private MariaDB on 127.0.0.1:$DB_PORT, then slurmdbd, then the cluster record.
#    Without it `sacct` fails, and submitit never sees a job that died without writing its result.
if [ "$ACCOUNTING" = 1 ]; then
  db="$DIR/mysql" dbrun="$DIR/mysql-run"
  # Everything mariadbd writes must be writable by user mysql (a root-owned socket dir keeps it from starting).
  install -d -o mysql -g mysql -m 755 "$dbrun"
  if ! running mariadbd; then
    if [ ! -d "$db/mysql" ]; then
      mariadb-install-db --no-defaults --user=mysql --datadir="$db" --auth-root-authentication-method=socket \
        --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: $DIR/log/mariadb-install.log"
    fi
    setsid mariadbd --no-defaults --user=mysql --datadir="$db" --bind-address=127.0.0.1 --port="$DB_PORT" \
      --socket="$dbrun/mysqld.sock" --pid-file="$dbrun/mysqld.pid" --log-error="$DIR/log/mariadb.log" \
      --skip-name-resolve </dev/null >/dev/null 2>&1 &
    wait_for "$WAIT" MariaDB mariadb --no-defaults -S "$dbrun/mysqld.sock" -u root -e "SELECT 1"
    cp "$dbrun/mysqld.pid" "$PIDS/mariadbd.pid"
  fi
  mariadb --no-defaults -S "$dbrun/mysqld.sock" -u root -e "
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$db_pass';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  if ! running slurmdbd; then
    slurmdbd
    wait_for "$WAIT" slurmdbd sacctmgr -n list cluster
  fi
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
fi

# ---------------------------------------------------------------------------------------------------------------
# 5. slurmctld, then slurmd under the node name of the config.
if ! running slurmctld; then
  slurmctld
  wait_for "$WAIT" slurmctld scontrol ping
fi
if ! running slurmd; then
  slurmd -N localhost
fi

# ---------------------------------------------------------------------------------------------------------------
# 6. The node idle. An earlier run may have left it down or drained (e.g. killed with jobs on it): resume it.
deadline=$(( $(date +%s) + WAIT ))
while :; do
  state=$(sinfo -h -n localhost -o %T 2>/dev/null | head -n1)
  case "$state" in
    idle|mixed|allocated) break ;;
    down*|drain*|fail*) scontrol update nodename=localhost state=resume 2>/dev/null || true ;;
  esac
  [ "$(date +%s)" -lt "$deadline" ] || die "node localhost is '${state:-unknown}' after ${WAIT} s (see $DIR/log/slurmd.log)"
  sleep 0.2
done

sinfo
say "up in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s; state in $DIR; stop with: bash ${0%start.sh}stop.sh"
