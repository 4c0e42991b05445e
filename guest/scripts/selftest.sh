#!/bin/sh
# minivmm.script=selftest: does guest user space work on this host?
#
# "minivmm: selftest start", one line per step, "minivmm: selftest STEP: ok
# [details]" or "minivmm: selftest STEP: FAILED reason", then
# "minivmm: selftest kmsg records=R crng_init_done=C run_init=I" (a report, not a step),
# "minivmm: selftest done ok=N failed=M uptime=S"; the exit status is M.
# Each line goes to the kernel log at KERN_ERR (printed even with "quiet", and
# even when the tty is broken) and to stdout (the console), so it usually shows
# twice. Steps that do not test fork/exec use shell builtins only, so that one
# broken mechanism fails its own step rather than every step.
# guest/README.md lists the lines; tests/test_userspace_boot.py checks them.

FORK_EXEC_N=50
PIPE_RUNS=10
ok=0
failed=0

say() {
	echo "<3>minivmm: selftest $*" >/dev/kmsg 2>/dev/null
	echo "minivmm: selftest $*"
}
pass() { # STEP [details]
	ok=$((ok + 1))
	say "$1: ok${2:+ $2}"
}
fail() { # STEP reason
	failed=$((failed + 1))
	say "$1: FAILED $2"
}

# Guest time from /proc/uptime (CLOCK_BOOTTIME, 10 ms steps), read by a builtin:
# sets now_text (as printed) and now_ms.
now() {
	read -r now_text _idle </proc/uptime
	# "123.45": whole seconds, then centiseconds ("1$frac - 100" avoids octal 0x).
	now_ms=$((${now_text%.*} * 1000 + (1${now_text#*.} - 100) * 10))
}

# The last pid handed out (5th field of /proc/loadavg): how many processes a step made.
last_pid() {
	read -r _l1 _l5 _l15 _running last_pid_value </proc/loadavg
}

say "start"

# -- mounts: proc, sysfs and devtmpfs, as /proc/mounts lists them
step_mounts() {
	if ! [ -r /proc/mounts ]; then
		fail mounts "cannot read /proc/mounts"
		return
	fi
	proc= sys= dev=
	while read -r _src dir type _rest; do
		case "$dir $type" in
		"/proc proc") proc=1 ;;
		"/sys sysfs") sys=1 ;;
		"/dev devtmpfs") dev=1 ;;
		esac
	done </proc/mounts
	missing=
	[ -n "$proc" ] || missing="$missing proc-on-/proc"
	[ -n "$sys" ] || missing="$missing sysfs-on-/sys"
	[ -n "$dev" ] || missing="$missing devtmpfs-on-/dev"
	if [ -z "$missing" ]; then
		pass mounts "proc=/proc sysfs=/sys devtmpfs=/dev"
	else
		fail mounts "not in /proc/mounts:$missing"
	fi
}
step_mounts

# -- cmdline: the kernel command line, read back
if read -r cmdline </proc/cmdline && [ -n "$cmdline" ]; then
	case " $cmdline " in
	*" minivmm.script=selftest "*) pass cmdline "$cmdline" ;;
	*) fail cmdline "minivmm.script=selftest not in: $cmdline" ;;
	esac
else
	fail cmdline "cannot read /proc/cmdline"
fi

# -- fork-exec: N x (fork, execve /bin/true, wait). A path with a slash is never
# a shell builtin or an in-process applet: ash forks and execs it. Then one exec
# that proves it: a new program's /proc/self/comm is its own name, a forked shell's is "sh".
step_fork_exec() {
	last_pid
	pid0=$last_pid_value
	now
	t0=$now_ms
	i=0
	while [ $i -lt $FORK_EXEC_N ]; do
		/bin/true || break
		i=$((i + 1))
	done
	now
	t1=$now_ms
	last_pid
	pids=$((last_pid_value - pid0))
	comm=$(/bin/cat /proc/self/comm 2>&1)
	/bin/sh -c 'exit 7'
	status=$?
	if [ $i -ne $FORK_EXEC_N ]; then
		fail fork-exec "cycle $((i + 1)) of $FORK_EXEC_N: /bin/true failed"
	elif [ $pids -lt $FORK_EXEC_N ]; then
		fail fork-exec "n=$i but only $pids new pids"
	elif [ "$comm" != cat ]; then
		fail fork-exec "n=$i; /bin/cat ran as '$comm', not as a new program"
	elif [ $status -ne 7 ]; then
		fail fork-exec "n=$i; exit status 7 came back as $status"
	else
		pass fork-exec "n=$i ms=$((t1 - t0)) us_per_cycle=$(((t1 - t0) * 1000 / i)) pids=$pids exec_comm=$comm exit_status=$status"
	fi
}
step_fork_exec

# -- sleep: 1 s of guest time, measured with /proc/uptime
now
before=$now_text
t0=$now_ms
sleep 1
sleep_status=$?
now
after=$now_text
ms=$((now_ms - t0))
if [ $sleep_status -ne 0 ]; then
	fail sleep "sleep 1 exited with status $sleep_status"
elif [ $ms -lt 900 ] || [ $ms -gt 10000 ]; then
	fail sleep "uptime_before=$before uptime_after=$after ms=$ms (want 900..10000)"
else
	pass sleep "uptime_before=$before uptime_after=$after ms=$ms"
fi

# -- tty: a line through /dev/console and one through /dev/ttyS0 (the host checks that
# "minivmm: tty-check via ..." arrived), drained; the UART's irq, tx and rx counts from the driver
step_tty() {
	errs=
	echo "minivmm: tty-check via /dev/console" >/dev/console 2>/dev/null || errs="$errs, writing /dev/console"
	echo "minivmm: tty-check via /dev/ttyS0" >/dev/ttyS0 2>/dev/null || errs="$errs, writing /dev/ttyS0"
	# Setting a mode already set still drains the output first (TCSETSW): the two lines
	# are on the wire before the kernel log line below can cut into them.
	stty -F /dev/ttyS0 onlcr 2>/dev/null || errs="$errs, draining /dev/ttyS0"
	uart=unknown
	while read -r line; do
		case "$line" in
		"0: "*)
			uart=
			for field in $line; do
				case "$field" in irq:* | tx:* | rx:*) uart="$uart ${field%%:*}=${field#*:}" ;; esac
			done
			uart=${uart# }
			;;
		esac
	done </proc/tty/driver/serial
	if [ -n "$errs" ]; then
		fail tty "${errs#, } ($uart)"
	else
		pass tty "console=written ttyS0=written drained $uart"
	fi
}
step_tty

# -- pipe: two external programs joined by a pipe, PIPE_RUNS times (a failure that
# depends on timing shows up in one run of several); the count must match the glob.
# A program killed by a signal shows as status 128+N (139: SIGSEGV).
step_pipe() {
	set -- /bin/*
	want=$#
	runs=
	i=1
	while [ $i -le $PIPE_RUNS ]; do
		# The subshell forks ls and execs wc itself; $? is wc's status.
		n=$(/bin/ls /bin | /usr/bin/wc -l)
		status=$?
		n=$((${n:-0} + 0))
		if [ "$status" != 0 ] || [ $n -ne $want ]; then
			case "$status" in
			139) why="wc killed by SIGSEGV (status 139)" ;;
			0) why="wc counted $n, want $want" ;;
			*) why="wc exited with status $status" ;;
			esac
			fail pipe "run $i of $PIPE_RUNS: $why; earlier runs:${runs:- none}"
			return
		fi
		runs="$runs $n"
		i=$((i + 1))
	done
	pass pipe "ls /bin | wc -l = $want, $PIPE_RUNS runs:$runs"
}
step_pipe

# -- kmsg: where the kernel log has "random: crng init done" and "Run /init as init process"
# (record numbers, 0: absent). Not a step: the host judges the order (the boot loader's RNG
# seed, setup_data SETUP_RNG_SEED, seeds the CRNG before user space). Both lines are below
# the console's level under `quiet`, so read them back; `dmesg` is a program start: try it a
# few times.
report_kmsg() {
	tries=0
	until dmesg >/tmp/selftest-dmesg 2>/dev/null || [ "$tries" -ge 3 ]; do tries=$((tries + 1)); done
	records=0 crng=0 run_init=0
	while read -r line; do
		records=$((records + 1))
		case "$line" in
		*"random: crng init done"*) [ "$crng" != 0 ] || crng=$records ;;
		*"Run /init as init process"*) [ "$run_init" != 0 ] || run_init=$records ;;
		esac
	done </tmp/selftest-dmesg
	say "kmsg records=$records crng_init_done=$crng run_init=$run_init"
}
report_kmsg

now
say "done ok=$ok failed=$failed uptime=$now_text"
exit $failed
