#!/bin/sh
# minivmm.script=powerfail-ext4: an ext4 workload for the flush-log test
# (tests/test_powerfail_boot.py, README "Power-failure simulation"). On /mnt (pmem0, DAX):
# create, write, fsync, rename and fsync the directory, 24 times, one file after the other,
# each with its own contents. Every flush point of the run (the flush log's epochs) must then
# be a file system that e2fsck accepts and that holds every file renamed before it: f1..fk.
n=${1:-24}
mkdir /mnt/work || echo "minivmm: ext4 FAILED: mkdir"
sync /mnt/work /mnt
i=1
while [ "$i" -le "$n" ]; do
	echo "minivmm powerfail-ext4 file $i" >"/mnt/work/f$i.tmp"
	sync "/mnt/work/f$i.tmp" || echo "minivmm: ext4 FAILED: fsync f$i.tmp"
	mv "/mnt/work/f$i.tmp" "/mnt/work/f$i"
	sync /mnt/work || echo "minivmm: ext4 FAILED: fsync /mnt/work after f$i"
	i=$((i + 1))
done
echo "minivmm: ext4 workload done files=$n"
