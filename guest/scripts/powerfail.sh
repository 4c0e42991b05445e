#!/bin/sh
# minivmm.script=powerfail: the guest side of the power-failure tests
# (tests/test_powerfail_boot.py, README "Power-failure simulation").
#
# Every pmem device N is an ext4 image holding the file /powerfail (two 4 KiB pages, made by
# the host). /dev/pmem0 is on /mnt (mounted by /init), /dev/pmemN on /mntN. On each:
#   page 0 <- "A-<tag>"  user-mode stores into a DAX mapping, then msync (a virtio-pmem FLUSH)
#   page 1 <- "B-<tag>"  the same stores, never flushed
# ext4 gets commit=3600 first: its periodic journal commit (every 5 s) is a flush too, and
# would make B durable before the host cuts the power.
# minivmm.powerfail=wait: after B, hold (no flush) until the host ends the run;
# minivmm.powerfail=poweroff (default): power off cleanly (the shutdown flushes B too).
mode=poweroff
ndev=1
for word in $(cat /proc/cmdline); do
	case "$word" in
	minivmm.powerfail=*) mode=${word#minivmm.powerfail=} ;;
	minivmm.pmemdevs=*) ndev=${word#minivmm.pmemdevs=} ;;
	esac
done
dirs=/mnt
mount -o remount,commit=3600 /mnt || echo "minivmm: powerfail FAILED: remount /mnt"
n=1
while [ "$n" -lt "$ndev" ]; do
	waited=0
	while [ ! -b "/dev/pmem$n" ] && [ "$waited" -lt 300 ]; do
		sleep 1
		waited=$((waited + 1))
	done
	mkdir -p "/mnt$n"
	mount -t ext4 -o dax,commit=3600 "/dev/pmem$n" "/mnt$n" || echo "minivmm: powerfail FAILED: mount /dev/pmem$n"
	dirs="$dirs /mnt$n"
	n=$((n + 1))
done
for dir in $dirs; do
	case " $(grep " $dir " /proc/mounts) " in
	*dax*) echo "minivmm: powerfail $dir dax=1" ;;
	*) echo "minivmm: powerfail FAILED: $dir is not mounted with dax" ;;
	esac
done
for dir in $dirs; do
	/sbin/minivmm-test "dax-store:$dir/powerfail:0:A-${dir#/}-flushed:msync" ||
		echo "minivmm: powerfail FAILED: A on $dir"
done
echo "minivmm: powerfail A flushed"
# One process for every B: minivmm-test syncs (a flush) when it exits, so B's stores must
# not be followed by an exit; with :hold the last step prints "minivmm-test: dax-store
# holding" once every B is stored, and never returns.
last=${dirs##* }
steps=
for dir in $dirs; do
	hold=
	[ "$mode" = wait ] && [ "$dir" = "$last" ] && hold=:hold
	steps="$steps dax-store:$dir/powerfail:1:B-${dir#/}-unflushed$hold"
done
# shellcheck disable=SC2086  # one argument per step
/sbin/minivmm-test $steps || echo "minivmm: powerfail FAILED: B"
echo "minivmm: powerfail B written"
