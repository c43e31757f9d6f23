#!/usr/bin/env bash
# A real Slurm cluster on this one host, for tests and demos: munged, slurmctld and N slurmd
# compute daemons ("node1".."nodeN", default 4), all state in one folder, no systemd or cgroups.
#
#   tools/local_slurm.sh up|down|status|env
#
# up      start whatever is not running yet (idempotent: a killed slurmd is simply restarted)
#         and wait until every node is usable; prints the environment lines clients need
# down    cancel all jobs, stop the daemons by their pid files, then kill any job process
#         (slurmstepd, tasks) that still carries this cluster's SLURM_CONF
# status  daemons, nodes and jobs; exit status 0 only when every daemon is alive
# env     the lines to eval: SLURM_CONF, and PATH with the sacct stand-in (no accounting here)
#
# Settings (environment): LOCAL_SLURM_DIR (default /tmp/ltrainer-slurm), LOCAL_SLURM_NODES (4),
# LOCAL_SLURM_PORT (controller port, default 26817; node k listens on PORT+k),
# LOCAL_SLURM_CRED_EXPIRE (5 s: with Slurm's default of 120 s a requeued job waits 2 minutes).
# Why these slurm.conf keys: see /work/shared/notes/slurm-one-host.md (multiple slurmd per host,
# munge on its own socket, fast requeue, a short SlurmdTimeout so that a dead node is noticed).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${LOCAL_SLURM_DIR:-/tmp/ltrainer-slurm}
NODES=${LOCAL_SLURM_NODES:-4}
PORT=${LOCAL_SLURM_PORT:-26817}
# credential lifetime (s); a requeued job also waits this long before it may start again
CRED_EXPIRE=${LOCAL_SLURM_CRED_EXPIRE:-5}
CONF=$DIR/slurm.conf
RUN=$DIR/run
LOG=$DIR/log
MUNGE_SOCKET=$DIR/munge/run/munge.socket
SHIMS=$HERE/slurm_shims

die() { echo "local_slurm: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the process named in the file exists
    [[ -f $1 ]] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null
}

node_names() { for ((k = 1; k <= NODES; k++)); do echo "node$k"; done; }

check_installed() {
    local missing=()
    for b in munged mungekey slurmctld slurmd sinfo squeue scancel scontrol; do
        command -v "$b" >/dev/null || [[ -x /usr/sbin/$b ]] || missing+=("$b")
    done
    if ((${#missing[@]})); then
        die "not installed: ${missing[*]}; run: apt-get install -y --no-install-recommends munge slurmctld slurmd slurm-client"
    fi
    # slurm-wlm-emulator repoints slurmd/slurmctld to a front-end build that cannot run nodes
    if readlink -f "$(command -v slurmd || echo /usr/sbin/slurmd)" | grep -q emulator; then
        die "slurmd is the slurm-wlm-emulator build; remove slurm-wlm-emulator"
    fi
}

write_conf() {
    local cpus mem
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) / 2 ))
    mkdir -p "$DIR/ctld" "$RUN" "$LOG" "$DIR/tmp"
    for n in $(node_names); do mkdir -p "$DIR/spool/$n"; done
    {
        echo "# written by tools/local_slurm.sh; all state under $DIR"
        echo "ClusterName=ltrainer"
        echo "SlurmctldHost=localhost"
        echo "SlurmctldPort=$PORT"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        echo "AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE"
        echo "StateSaveLocation=$DIR/ctld"
        echo "SlurmdSpoolDir=$DIR/spool/%n"
        echo "SlurmctldPidFile=$RUN/slurmctld.pid"
        echo "SlurmdPidFile=$RUN/slurmd-%n.pid"
        echo "SlurmctldLogFile=$LOG/slurmctld.log"
        echo "SlurmdLogFile=$LOG/slurmd-%n.log"
        echo "TmpFS=$DIR/tmp"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "JobCompType=jobcomp/none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_CPU"
        echo "MpiDefault=none"
        echo "SwitchType=switch/none"
        echo "MailProg=/bin/true"
        echo "ReturnToService=2"
        echo "JobRequeue=1"
        echo "SchedulerType=sched/backfill"
        echo "SchedulerParameters=sched_interval=5,bf_interval=2"
        echo "MinJobAge=600"
        # a dead node is declared DOWN (and its jobs requeued) after ~10 s, not the default 300 s
        echo "SlurmdTimeout=10"
        echo "KillWait=5"
        echo "InactiveLimit=0"
        for ((k = 1; k <= NODES; k++)); do
            echo "NodeName=node$k NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + k)) CPUs=$cpus RealMemory=$mem State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
    } >"$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
}

start_munge() {
    alive "$DIR/munge/run/munged.pid" && return 0
    mkdir -p "$DIR/munge/etc" "$DIR/munge/run" "$DIR/munge/lib" "$LOG"
    chmod 0755 "$DIR" "$DIR/munge" "$DIR/munge/run"   # clients must reach the socket
    chmod 0700 "$DIR/munge/etc" "$DIR/munge/lib"
    if [[ ! -f $DIR/munge/etc/munge.key ]]; then
        mungekey --create --keyfile="$DIR/munge/etc/munge.key" >/dev/null
    fi
    chmod 0400 "$DIR/munge/etc/munge.key"
    rm -f "$MUNGE_SOCKET"
    LOCAL_SLURM_DIR=$DIR munged --key-file="$DIR/munge/etc/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$DIR/munge/run/munged.pid" --log-file="$LOG/munged.log" \
        --seed-file="$DIR/munge/lib/munged.seed" --force
    for _ in $(seq 50); do [[ -S $MUNGE_SOCKET ]] && return 0; sleep 0.1; done
    die "munged did not create its socket; see $LOG/munged.log"
}

start_ctld() {
    alive "$RUN/slurmctld.pid" && return 0
    # -c: clean state (job ids restart at 1, which is why launchers use a fresh submitit folder)
    LOCAL_SLURM_DIR=$DIR SLURM_CONF=$CONF slurmctld -c -f "$CONF" ||
        die "slurmctld failed; see $LOG/slurmctld.log"
    for _ in $(seq 100); do
        SLURM_CONF=$CONF scontrol ping >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    tail -5 "$LOG/slurmctld.log" >&2 || true
    die "slurmctld does not answer; see $LOG/slurmctld.log"
}

start_nodes() {
    for n in $(node_names); do
        alive "$RUN/slurmd-$n.pid" && continue
        LOCAL_SLURM_DIR=$DIR SLURM_CONF=$CONF slurmd -f "$CONF" -N "$n" ||
            die "slurmd $n failed; see $LOG/slurmd-$n.log"
    done
}

wait_nodes() {  # until no node is down, unknown, draining or not responding
    local bad=""
    for _ in $(seq 120); do
        bad=$(SLURM_CONF=$CONF sinfo -h -N -o '%N %t' 2>/dev/null |
              awk '$2 ~ /(\*|down|unk|drain|fail|boot)/ {print $1 "=" $2}' | sort -u | tr '\n' ' ')
        if [[ -z $bad ]] && [[ $(SLURM_CONF=$CONF sinfo -h -N -o '%N' | sort -u | wc -l) -eq $NODES ]]; then
            return 0
        fi
        sleep 0.5
    done
    die "nodes not ready after 60 s: $bad(see $LOG/)"
}

print_env() {
    echo "export SLURM_CONF=$CONF"
    echo "export PATH=$SHIMS:\$PATH"
}

cluster_pids() {
    # Processes left by this cluster: slurmstepd and job tasks (they carry its SLURM_CONF and a
    # SLURM_JOB_ID), and daemons whose pid file is gone (they carry LOCAL_SLURM_DIR). Matching on
    # SLURM_CONF alone would also hit the shell that runs the tests.
    local p env comm
    for p in /proc/[0-9]*; do
        [[ ${p#/proc/} == "$$" || ${p#/proc/} == "$PPID" ]] && continue
        env=$( { tr '\0' '\n' <"$p/environ"; } 2>/dev/null) || continue
        comm=$( { cat "$p/comm"; } 2>/dev/null) || continue
        if grep -qx "SLURM_CONF=$CONF" <<<"$env"; then
            if [[ $comm == slurmstepd ]] || grep -q '^SLURM_JOB_ID=' <<<"$env"; then
                echo "${p#/proc/}"; continue
            fi
        fi
        if [[ $comm =~ ^(slurmd|slurmctld|slurmstepd|munged)$ ]] && grep -qx "LOCAL_SLURM_DIR=$DIR" <<<"$env"; then
            echo "${p#/proc/}"
        fi
    done
}

any_alive() {
    local p
    for p in "$@"; do kill -0 "$p" 2>/dev/null && return 0; done
    return 1
}

stop_pidfiles() {  # stop_pidfiles FILE...: TERM all at once, KILL what is left after 5 s
    local f pids=()
    for f in "$@"; do
        if alive "$f"; then pids+=("$(cat "$f")"); fi
    done
    if ((${#pids[@]})); then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        for _ in $(seq 50); do
            any_alive "${pids[@]}" || break
            sleep 0.1
        done
        kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
    rm -f "$@"
}

cmd_up() {
    check_installed
    mkdir -p "$DIR"
    if ! alive "$RUN/slurmctld.pid"; then write_conf; fi
    [[ -f $CONF ]] || write_conf
    start_munge
    start_ctld
    start_nodes
    wait_nodes
    print_env
}

cmd_down() {
    if alive "$RUN/slurmctld.pid"; then
        local jobs
        jobs=$(SLURM_CONF=$CONF squeue -h -o '%A' 2>/dev/null | tr '\n' ' ' || true)
        if [[ -n ${jobs// /} ]]; then
            # shellcheck disable=SC2086
            SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
            for _ in $(seq 30); do   # what is still running after 3 s is killed below
                [[ -z $(SLURM_CONF=$CONF squeue -h -o '%A' 2>/dev/null) ]] && break
                sleep 0.1
            done
        fi
    fi
    stop_pidfiles "$RUN"/slurmd-*.pid "$RUN/slurmctld.pid"
    stop_pidfiles "$DIR/munge/run/munged.pid"
    local left
    left=$(cluster_pids | tr '\n' ' ')
    if [[ -n ${left// /} ]]; then
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null || true
        echo "local_slurm: killed leftover job processes: $left" >&2
    fi
    echo "local_slurm: stopped (state kept in $DIR)"
}

cmd_status() {
    local ok=0 f
    for f in "$DIR/munge/run/munged.pid" "$RUN/slurmctld.pid" $(for n in $(node_names); do echo "$RUN/slurmd-$n.pid"; done); do
        if alive "$f"; then echo "up    $(basename "$f" .pid) (pid $(cat "$f"))"; else echo "down  $(basename "$f" .pid)"; ok=1; fi
    done
    if alive "$RUN/slurmctld.pid"; then
        SLURM_CONF=$CONF sinfo -N -o '%N %t %c' || true
        SLURM_CONF=$CONF squeue -t all -o '%i %T %j %D %N %r' || true
    fi
    return $ok
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) print_env ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
