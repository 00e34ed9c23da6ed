#!/usr/bin/env bash
# A real one-node SLURM on this machine, to try the cluster path (slurm/*.sbatch, submit_sweep.sh)
# before a real cluster, and for the tests. Run as root; Debian/Ubuntu's slurm-wlm and munge:
#
#   bash slurm/local_cluster.sh install     # apt-get install slurm-wlm munge, when missing
#   bash slurm/local_cluster.sh start       # munged, slurmctld, slurmd; prints `export SLURM_CONF=...`
#   export SLURM_CONF=/tmp/brain-encoding-slurm/slurm.conf
#   sbatch --gpus-per-node 2 slurm/gpu_stage.sbatch 03_train_vqvae.py --work work --device cpu ...
#   squeue; scontrol show job N; tail slurm-brain-gpu-N.out
#   bash slurm/local_cluster.sh status      # the daemons and the node
#   bash slurm/local_cluster.sh stop        # stop the daemons and remove the state folder
#
# The node is this machine under its short hostname, declared with LOCAL_CLUSTER_CPUS CPUs (default 64),
# LOCAL_CLUSTER_MEMORY_MB of memory (default 262144: 256 GB) and LOCAL_CLUSTER_GPUS GPUs (default 4) on
# dummy files (gres.conf, AutoDetect=off): the jobs then run on the CPU, as on a node whose GPUs torch
# does not see. Smaller values make a small node, on which the templates' default resources must fit. Two
# partitions share the node: `batch` (the default) and `urgent`, whose jobs preempt `batch` jobs
# (PreemptType=preempt/partition_prio, PreemptMode=REQUEUE): a preempted job gets SIGTERM, keeps running
# for GraceTime (LOCAL_CLUSTER_GRACE_S, default 60 s) and is requeued. Everything lives in
# LOCAL_CLUSTER_DIR (default /tmp/brain-encoding-slurm): configuration, munge key and socket, spool,
# state, daemon logs (slurmctld.log, slurmd.log), jobcomp.log (one line per finished job). Ports:
# LOCAL_CLUSTER_PORT (slurmctld, default 6817) and the next one (slurmd).
set -euo pipefail

state=${LOCAL_CLUSTER_DIR:-/tmp/brain-encoding-slurm}
port=${LOCAL_CLUSTER_PORT:-6817}
cpus=${LOCAL_CLUSTER_CPUS:-64}
memory=${LOCAL_CLUSTER_MEMORY_MB:-262144}
gpus=${LOCAL_CLUSTER_GPUS:-4}
grace=${LOCAL_CLUSTER_GRACE_S:-60}
node=$(hostname -s)

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

installed() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null
}

install() {   # never fails for want of root or apt-get: the tests then skip, saying why
  installed && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "local_cluster.sh: slurm-wlm and munge are not installed, and this needs root and apt-get:" \
         "the SLURM tests will be skipped" >&2
    return 0
  fi
  echo "local_cluster.sh: installing slurm-wlm and munge (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
  cat > "$state/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$state/munge.socket
CredType=cred/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$state/jobcomp.log
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=3600
KillWait=30
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory Gres=gpu:$gpus State=UNKNOWN
PartitionName=batch Nodes=$node Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=$grace
PartitionName=urgent Nodes=$node MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
  printf 'AutoDetect=off\nName=gpu File=%s/gpu[0-%d]\n' "$state" $((gpus - 1)) > "$state/gres.conf"
  echo "# no cgroups here: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none" > "$state/cgroup.conf"
}

start() {
  install
  installed || die "slurm-wlm and munge are not installed"
  [ "$(id -u)" = 0 ] || die "slurmd must run as root"
  stop quiet
  rm -rf "$state"
  mkdir -p -m 0700 "$state"
  mkdir -p "$state/ctld" "$state/spool"
  for i in $(seq 0 $((gpus - 1))); do mknod "$state/gpu$i" c 1 3; done   # dummy GPUs, like /dev/null
  write_config
  dd if=/dev/urandom of="$state/munge.key" bs=1024 count=1 status=none
  chmod 0400 "$state/munge.key"
  munged --force --key-file "$state/munge.key" --socket "$state/munge.socket" --pid-file "$state/munged.pid" \
    --log-file "$state/munged.log" --seed-file "$state/munged.seed"
  export SLURM_CONF=$state/slurm.conf
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF"
  for _ in $(seq 60); do   # the node registers within seconds
    if sinfo -h -N -o %t 2>/dev/null | grep -q -E '^(idle|mix|alloc)'; then
      echo "local_cluster.sh: one-node SLURM $(sinfo -V | cut -d' ' -f2) up on $node (state in $state)"
      echo "export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 1
  done
  die "the node did not come up: see $state/slurmctld.log and $state/slurmd.log"
}

stop() {
  local pidfile pid
  for pidfile in "$state/slurmd.pid" "$state/slurmctld.pid" "$state/munged.pid"; do
    [ -s "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
  if [ "${1:-}" != quiet ]; then
    rm -rf "$state"
    echo "local_cluster.sh: stopped"
  fi
}

status() {
  export SLURM_CONF=$state/slurm.conf
  [ -f "$SLURM_CONF" ] || die "not started ($SLURM_CONF is missing)"
  scontrol ping
  sinfo
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: bash slurm/local_cluster.sh install|start|stop|status" >&2; exit 2 ;;
esac
