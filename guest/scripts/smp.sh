#!/bin/sh
# minivmm.script=smp: an SMP guest's facts and work on every CPU, then power off (/init does).
#
#   minivmm: smp online=0-1 cpus=2
#   minivmm: smp busy cpu=N ran_on=N          a forked shell loop pinned to CPU N (taskset -p)
#   minivmm: smp cpu=N ticks=D loc=D          user+system ticks (/proc/stat) and local APIC timer
#                                             interrupts (/proc/interrupts LOC) gained during the loops
#   minivmm: smp flush cpu=N allowed=N ran_on=N overlap=yes|no result=<minivmm-test line>
#                                             `minivmm-test flush-bench:N` pinned to CPU N (taskset -c),
#                                             each started once the one before it runs (overlap: the
#                                             previous one was still flushing when this one started)
#   minivmm: smp segfault <kernel log line>    each "segfault at" the kernel logged (kvm_pvm's
#                                             known crash of a freshly started program)
#   minivmm: smp done
#
# No pipes and no two programs started at once (kvm_pvm crashes programs started together):
# the loops are forks of this shell, pinned afterwards; everything is read with builtins.

FLUSHES=${FLUSHES:-60}
ncpus=0
read -r online </sys/devices/system/cpu/online
while read -r name _; do
	case "$name" in cpu[0-9]*) ncpus=$((ncpus + 1)) ;; esac
done </proc/stat
echo "minivmm: smp online=$online cpus=$ncpus"

# $1: CPU; prints "TICKS LOC" for it (user+nice+system from /proc/stat, its LOC column)
cpu_counts() {
	local cpu=$1 name user nice system rest ticks=0 loc=0
	while read -r name user nice system rest; do
		[ "$name" = "cpu$cpu" ] && ticks=$((user + nice + system))
	done </proc/stat
	while read -r name rest; do
		if [ "$name" = LOC: ]; then
			set -- $rest
			shift "$cpu"
			loc=$1
		fi
	done </proc/interrupts
	echo "$ticks $loc"
}

# The CPU a process last ran on: field 39 of /proc/PID/stat (comm has no spaces here).
last_cpu() {
	local fields
	read -r fields <"/proc/$1/stat" || return
	set -- $fields
	shift 38
	echo "$1"
}

cpu=0
while [ "$cpu" -lt "$ncpus" ]; do
	eval "before_$cpu=\"$(cpu_counts $cpu)\""
	cpu=$((cpu + 1))
done

# A busy loop per CPU: fork, pin, let it spin, then ask where it ran.
pids=
cpu=0
while [ "$cpu" -lt "$ncpus" ]; do
	(
		i=0
		while [ ! -e /tmp/smp-stop ]; do i=$((i + 1)); done
	) &
	pid=$!
	taskset -p -c "$cpu" "$pid" >/dev/null
	pids="$pids $pid:$cpu"
	cpu=$((cpu + 1))
done
sleep 3
for entry in $pids; do
	echo "minivmm: smp busy cpu=${entry#*:} ran_on=$(last_cpu ${entry%:*})"
done
: >/tmp/smp-stop
for entry in $pids; do
	wait "${entry%:*}"
done

cpu=0
while [ "$cpu" -lt "$ncpus" ]; do
	eval "set -- \$before_$cpu"
	b_ticks=$1 b_loc=$2
	set -- $(cpu_counts $cpu)
	echo "minivmm: smp cpu=$cpu ticks=$(($1 - b_ticks)) loc=$(($2 - b_loc))"
	cpu=$((cpu + 1))
done

# pmem flushes from every CPU at once, if /mnt is mounted (init.sh mounts /dev/pmem0 there).
mounted=
while read -r _ dir _; do
	[ "$dir" = /mnt ] && mounted=1
done </proc/mounts
if [ -n "$mounted" ]; then
	flushers=
	prev=
	cpu=0
	while [ "$cpu" -lt "$ncpus" ]; do
		out=/tmp/smp-flush.$cpu
		: >"$out"
		taskset -c "$cpu" /sbin/minivmm-test "flush-bench:$FLUSHES" >"$out" 2>&1 &
		pid=$!
		# wait until it runs (its first line) before the next program starts
		line=
		while [ -z "$line" ] && kill -0 "$pid" 2>/dev/null; do
			read -r line <"$out"
			[ -n "$line" ] || sleep 0.1
		done
		allowed=?
		while read -r key value; do
			[ "$key" = Cpus_allowed_list: ] && allowed=$value
		done <"/proc/$pid/status"
		ran_on=$(last_cpu "$pid")
		overlap=no
		[ -n "$prev" ] && kill -0 "$prev" 2>/dev/null && overlap=yes
		[ -z "$prev" ] && overlap=first
		flushers="$flushers $pid:$cpu:$allowed:${ran_on:-?}:$overlap"
		prev=$pid
		cpu=$((cpu + 1))
	done
	for entry in $flushers; do
		IFS=:
		set -- $entry
		IFS=' 	
'
		pid=$1 cpu=$2 allowed=$3 ran_on=$4 overlap=$5
		wait "$pid"
		status=$?
		result=
		while read -r line; do
			case "$line" in *flush-bench*) result=$line ;; esac
		done <"/tmp/smp-flush.$cpu"
		echo "minivmm: smp flush cpu=$cpu allowed=$allowed ran_on=$ran_on overlap=$overlap status=$status result=$result"
	done
else
	echo "minivmm: smp no pmem mounted on /mnt"
fi
# The kernel logs each program killed by a fault ("exe[N]: segfault at 0 ip ..."), below the
# console's level under `quiet`: copy those lines out, so the host can tell kvm_pvm's known crash
# from another failure. `dmesg` is a program start too: try it a few times.
tries=0
until dmesg >/tmp/smp-dmesg 2>/dev/null || [ "$tries" -ge 3 ]; do tries=$((tries + 1)); done
while read -r line; do
	case "$line" in *"segfault at"*) echo "minivmm: smp segfault $line" ;; esac
done </tmp/smp-dmesg
echo "minivmm: smp done"
