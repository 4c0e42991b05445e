/*
 * minivmm-test: a static test init for the minivmm default guest.
 *
 * Boot it with rdinit=/sbin/minivmm-test.  It never forks (threads only) unless
 * the fork-exec step asks for it, so a guest whose fork/exec path is broken
 * still reports.  It runs the steps named on the kernel command line and then
 * ends the VM:
 *
 *   minivmm.steps=hello,mounts,getpid:1000,uname   (comma separated)
 *   minivmm.end=poweroff|reboot|panic|none          (default: poweroff)
 *
 * A step is NAME, NAME:ARG, or NAME followed by digits (getpid1000 is
 * getpid:1000).  Parameters containing a dot never reach init's argv or
 * environment (the kernel takes them for module parameters), so they are read
 * from /proc/cmdline.  Run from a shell, the arguments are the steps instead.
 *
 * Every line starts with "minivmm-test: " and goes both to /dev/kmsg (printk
 * is synchronous, so it shows even when the tty path is broken) and to
 * /dev/console.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <linux/serial.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PREFIX "minivmm-test: "
#define MNT "/mnt"
#define TOKEN_FILE MNT "/minivmm-token"
#define MAX_LINE 512

static int console_fd = -1;
/* Run as pid 1 (the guest's init), not from a shell. */
static int is_init;

/* One result line to the kernel log and to the console. */
static void say(const char *fmt, ...)
{
	char line[MAX_LINE];
	int n, head;
	va_list ap;

	/* KERN_ERR level so the line is printed even with "quiet". */
	head = snprintf(line, sizeof line, "<3>" PREFIX);
	va_start(ap, fmt);
	n = vsnprintf(line + head, sizeof line - head - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	n += head;
	if (n > (int)sizeof line - 2)
		n = sizeof line - 2;
	line[n++] = '\n';

	/* From a shell, stdout only: never the kernel log of whoever runs us. */
	if (!is_init) {
		(void)!write(1, line + 3, n - 3);
		return;
	}
	/* Reopen per line: /dev/kmsg rate-limits each open file to 10 lines. */
	int kfd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
	if (kfd >= 0) {
		(void)!write(kfd, line, n);
		close(kfd);
	}
	(void)!write(console_fd >= 0 ? console_fd : 2, line + 3, n - 3);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

/* mount(2) that treats "already mounted" as success. */
static int mount_once(const char *src, const char *dst, const char *type,
		      const char *opts)
{
	mkdir(dst, 0755);
	if (mount(src, dst, type, 0, opts) == 0 || errno == EBUSY)
		return 0;
	return -1;
}

/* proc, sysfs and devtmpfs; only as init, never over a host's mounts. */
static void basic_mounts(void)
{
	if (!is_init)
		return;
	mount_once("proc", "/proc", "proc", NULL);
	mount_once("sysfs", "/sys", "sysfs", NULL);
	mount_once("devtmpfs", "/dev", "devtmpfs", NULL);
}

static long parse_count(const char *arg, long dflt)
{
	char *end;
	long v;

	if (!arg || !*arg)
		return dflt;
	v = strtol(arg, &end, 10);
	return (*end || v <= 0) ? -1 : v;
}

/* Read a whole small file into buf; returns length or -1. */
static ssize_t read_small(const char *path, char *buf, size_t size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = read(fd, buf, size - 1);
	close(fd);
	if (n < 0)
		return -1;
	buf[n] = 0;
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
		buf[--n] = 0;
	return n;
}

/* ---- steps: each returns 0 on success, or -1 after saying why ---- */

static int step_hello(const char *arg)
{
	(void)arg;
	say("hello pid=%d", (int)getpid());
	return 0;
}

static int mounted(const char *mounts, const char *dir, const char *type)
{
	char pat[64];

	snprintf(pat, sizeof pat, " %s %s ", dir, type);
	return strstr(mounts, pat) != NULL;
}

static int step_mounts(const char *arg)
{
	static char buf[8192];
	int proc, sys, dev;

	(void)arg;
	basic_mounts();
	if (read_small("/proc/mounts", buf, sizeof buf) < 0) {
		say("mounts FAILED: cannot read /proc/mounts: %s", strerror(errno));
		return -1;
	}
	proc = mounted(buf, "/proc", "proc");
	sys = mounted(buf, "/sys", "sysfs");
	dev = mounted(buf, "/dev", "devtmpfs");
	say("mounts proc=%s sys=%s dev=%s", proc ? "ok" : "missing",
	    sys ? "ok" : "missing", dev ? "ok" : "missing");
	return proc && sys && dev ? 0 : -1;
}

static int step_getpid(const char *arg)
{
	long n = parse_count(arg, 1000), i;
	uint64_t t0, t1;

	if (n < 0) {
		say("getpid FAILED: bad count '%s'", arg);
		return -1;
	}
	t0 = now_ns();
	for (i = 0; i < n; i++)
		syscall(SYS_getpid);	/* direct: never a libc-cached value */
	t1 = now_ns();
	say("getpid n=%ld total_ns=%llu ns_per_call=%llu", n,
	    (unsigned long long)(t1 - t0), (unsigned long long)((t1 - t0) / n));
	return 0;
}

static int step_uname(const char *arg)
{
	struct utsname u;

	(void)arg;
	if (uname(&u) < 0) {
		say("uname FAILED: %s", strerror(errno));
		return -1;
	}
	say("uname sysname=%s release=%s machine=%s version=%s", u.sysname,
	    u.release, u.machine, u.version);
	return 0;
}

static int step_sleep(const char *arg)
{
	long ms = parse_count(arg, 1000);
	struct timespec ts;

	if (ms < 0) {
		say("sleep FAILED: bad milliseconds '%s'", arg);
		return -1;
	}
	ts.tv_sec = ms / 1000;
	ts.tv_nsec = (ms % 1000) * 1000000;
	nanosleep(&ts, NULL);
	say("sleep ms=%ld", ms);
	return 0;
}

static int is_pmem_name(const char *name)
{
	return strncmp(name, "pmem", 4) == 0 && name[4] >= '0' && name[4] <= '9';
}

/* Count the entries of directory `dir` that `want` accepts (-1 if it cannot be read). */
static int count_entries(const char *dir, int (*want)(const char *dir, const char *name))
{
	struct dirent *de;
	int n = 0;
	DIR *d = opendir(dir);

	if (!d)
		return -1;
	while ((de = readdir(d)))
		n += de->d_name[0] != '.' && want(dir, de->d_name);
	closedir(d);
	return n;
}

static int is_virtio_pmem(const char *dir, const char *name)
{
	char path[300], val[16];

	snprintf(path, sizeof path, "%s/%s/device", dir, name);
	return read_small(path, val, sizeof val) > 0 && strtoul(val, NULL, 0) == 27; /* virtio ID 27 */
}

static int is_pmem_block(const char *dir, const char *name)
{
	(void)dir;
	return is_pmem_name(name);
}

/*
 * nd_pmem probes in the background (libnvdimm's async domain, not waited for before init
 * runs), and building struct pages for a large device takes seconds on a software KVM: wait
 * until every virtio-pmem device (virtio ID 27) has its /sys/block/pmemN, up to 600 s.
 */
static void wait_for_pmem_devices(void)
{
	int want = count_entries("/sys/bus/virtio/devices", is_virtio_pmem);

	for (int tenths = 0; tenths < 6000; tenths++) {
		if (count_entries("/sys/block", is_pmem_block) >= want)
			return;
		usleep(100000);
	}
	say("pmem: only %d of %d virtio-pmem block devices after 600 s",
	    count_entries("/sys/block", is_pmem_block), want);
}

static int step_pmem_list(const char *arg)
{
	char path[300], val[64];
	struct dirent *de;
	int count = 0;
	DIR *d;

	(void)arg;
	wait_for_pmem_devices();
	d = opendir("/sys/block");
	if (!d) {
		say("pmem-list FAILED: /sys/block: %s", strerror(errno));
		return -1;
	}
	while ((de = readdir(d)) != NULL) {
		unsigned long long sectors = 0;
		int dax = -1;

		if (!is_pmem_name(de->d_name))
			continue;
		snprintf(path, sizeof path, "/sys/block/%s/size", de->d_name);
		if (read_small(path, val, sizeof val) > 0)
			sectors = strtoull(val, NULL, 10);
		snprintf(path, sizeof path, "/sys/block/%s/queue/dax", de->d_name);
		if (read_small(path, val, sizeof val) > 0)
			dax = atoi(val);
		say("pmem-list dev=%s bytes=%llu dax=%d", de->d_name, sectors * 512,
		    dax);
		count++;
	}
	closedir(d);
	say("pmem-list count=%d", count);
	return 0;
}

/* pmem-mount[:pmemN]: ext4 on /mnt with DAX, falling back to no DAX. */
static int step_pmem_mount(const char *arg)
{
	const char *name = arg && *arg ? arg : "pmem0";
	char dev[64];
	int err;

	snprintf(dev, sizeof dev, "/dev/%s", name);
	wait_for_pmem_devices();
	mkdir(MNT, 0755);
	if (mount(dev, MNT, "ext4", 0, "dax") == 0) {
		say("pmem-mount dev=%s dir=" MNT " dax=1", dev);
		return 0;
	}
	err = errno;
	if (mount(dev, MNT, "ext4", 0, NULL) == 0) {
		say("pmem-mount dev=%s dir=" MNT " dax=0 (dax mount failed: %s)", dev,
		    strerror(err));
		return 0;
	}
	say("pmem-mount FAILED: %s: %s", dev, strerror(errno));
	return -1;
}

static int write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		buf += n;
		len -= n;
	}
	return 0;
}

static int step_pmem_write(const char *arg)
{
	int fd;

	if (!arg || !*arg) {
		say("pmem-write FAILED: no token (use pmem-write:TOKEN)");
		return -1;
	}
	fd = open(TOKEN_FILE, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0 || write_all(fd, arg, strlen(arg)) < 0 || write_all(fd, "\n", 1) < 0 ||
	    fsync(fd) < 0) {
		say("pmem-write FAILED: " TOKEN_FILE ": %s", strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	close(fd);
	say("pmem-write token=%s", arg);
	return 0;
}

static int step_pmem_read(const char *arg)
{
	char buf[256];

	(void)arg;
	if (read_small(TOKEN_FILE, buf, sizeof buf) < 0) {
		say("pmem-read FAILED: " TOKEN_FILE ": %s", strerror(errno));
		return -1;
	}
	say("pmem-read token=%s", buf);
	return 0;
}

struct flush_result {
	long n;
	int id;
	int failed_errno;
	uint64_t total_ns, min_ns, max_ns;
	uint64_t *samples; /* per-operation latency, when not NULL (n entries) */
};

/* n x (4 KiB pwrite + fdatasync) on MNT/minivmm-flush-<id>. */
static void *flush_worker(void *p)
{
	struct flush_result *r = p;
	static const char block[4096] = { 'm' };
	char path[64];
	long i;
	int fd;

	r->min_ns = UINT64_MAX;
	snprintf(path, sizeof path, MNT "/minivmm-flush-%d", r->id);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		r->failed_errno = errno;
		return NULL;
	}
	for (i = 0; i < r->n; i++) {
		uint64_t t0 = now_ns(), dt;

		if (pwrite(fd, block, sizeof block, (off_t)(i % 256) * 4096) !=
			    (ssize_t)sizeof block || fdatasync(fd) < 0) {
			r->failed_errno = errno ? errno : EIO;
			break;
		}
		dt = now_ns() - t0;
		if (r->samples)
			r->samples[i] = dt;
		r->total_ns += dt;
		if (dt < r->min_ns)
			r->min_ns = dt;
		if (dt > r->max_ns)
			r->max_ns = dt;
	}
	close(fd);
	unlink(path);
	return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* The p-th percentile (nearest rank) of n sorted samples. */
static uint64_t percentile(const uint64_t *sorted, long n, int p)
{
	long rank = (n * p + 99) / 100;

	return sorted[rank > 0 ? rank - 1 : 0];
}

static int step_flush_bench(const char *arg)
{
	struct flush_result r = { .n = parse_count(arg, 100) };

	if (r.n < 1) {
		say("flush-bench FAILED: bad count '%s'", arg);
		return -1;
	}
	r.samples = calloc((size_t)r.n, sizeof *r.samples);
	if (!r.samples) {
		say("flush-bench FAILED: out of memory");
		return -1;
	}
	flush_worker(&r);
	if (r.failed_errno) {
		say("flush-bench FAILED: %s", strerror(r.failed_errno));
		free(r.samples);
		return -1;
	}
	qsort(r.samples, (size_t)r.n, sizeof *r.samples, cmp_u64);
	say("flush-bench n=%ld ns_per_op=%llu min_ns=%llu max_ns=%llu p50_ns=%llu p99_ns=%llu", r.n,
	    (unsigned long long)(r.total_ns / r.n), (unsigned long long)r.min_ns,
	    (unsigned long long)r.max_ns, (unsigned long long)percentile(r.samples, r.n, 50),
	    (unsigned long long)percentile(r.samples, r.n, 99));
	free(r.samples);
	return 0;
}

/* flush-threads:TxN: T threads, each N x (4 KiB write + fdatasync), at once. */
static int step_flush_threads(const char *arg)
{
	long threads = 4, n = 16;
	struct flush_result r[64];
	pthread_t tid[64];
	uint64_t t0, t1;
	int i, failed = 0;

	if (arg && *arg && (sscanf(arg, "%ldx%ld", &threads, &n) < 1 ||
			    threads < 1 || threads > 64 || n < 1)) {
		say("flush-threads FAILED: bad argument '%s' (use TxN, T<=64)", arg);
		return -1;
	}
	memset(r, 0, sizeof r);
	t0 = now_ns();
	for (i = 0; i < threads; i++) {
		r[i].n = n;
		r[i].id = i;
		if (pthread_create(&tid[i], NULL, flush_worker, &r[i]) != 0) {
			threads = i;
			failed = 1;
			break;
		}
	}
	for (i = 0; i < threads; i++)
		pthread_join(tid[i], NULL);
	t1 = now_ns();
	for (i = 0; i < threads; i++)
		if (r[i].failed_errno) {
			say("flush-threads FAILED: thread %d: %s", i,
			    strerror(r[i].failed_errno));
			failed = 1;
		}
	if (failed)
		return -1;
	say("flush-threads threads=%ld n=%ld wall_ns=%llu ops_per_s=%llu", threads, n,
	    (unsigned long long)(t1 - t0),
	    (unsigned long long)(threads * n * 1000000000ull / (t1 - t0 ? t1 - t0 : 1)));
	return 0;
}

/* Sizes of the x86-64 page-table levels a DAX fault can map (PTE, PMD). */
#define SZ_4K 4096ul
#define SZ_2M (2ul << 20)

/* A /proc/vmstat counter (e.g. thp_fault_fallback), or -1 if the kernel has none. The file
 * is longer than one read() returns (seq_file fills a page at a time): read to the end. */
static long long vmstat_counter(const char *name)
{
	static char buf[32768];
	size_t len = strlen(name), have = 0;
	int fd = open("/proc/vmstat", O_RDONLY | O_CLOEXEC);
	ssize_t n = 1;
	char *line;

	if (fd < 0)
		return -1;
	while (n > 0 && have < sizeof buf - 1) {
		n = read(fd, buf + have, sizeof buf - 1 - have);
		have += n > 0 ? (size_t)n : 0;
	}
	close(fd);
	buf[have] = 0;
	for (line = buf; line && *line; line = strchr(line, '\n'), line = line ? line + 1 : NULL)
		if (!strncmp(line, name, len) && line[len] == ' ')
			return atoll(line + len + 1);
	return -1;
}

/* Page faults this process has taken so far (minor + major: a DAX fault that allocates
 * blocks counts as major, one that finds them as minor). */
static long faults_so_far(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_minflt + ru.ru_majflt;
}

/*
 * How many of the file's 2 MiB pieces in [0, len) one extent covers wholly, starting at a
 * 2 MiB-aligned device offset: the pieces fs/dax.c (dax_iomap_pmd_fault) can map with one
 * PMD, given a 2 MiB-aligned pmem device. FIEMAP, Documentation/filesystems/fiemap.rst.
 */
static long pmd_ready_pieces(int fd, size_t len)
{
	enum { MAX_EXTENTS = 256 };
	static char buf[sizeof(struct fiemap) + MAX_EXTENTS * sizeof(struct fiemap_extent)];
	struct fiemap *fm = (struct fiemap *)buf;
	long pieces = 0;
	unsigned i;

	memset(buf, 0, sizeof buf);
	fm->fm_length = len;
	fm->fm_flags = FIEMAP_FLAG_SYNC;
	fm->fm_extent_count = MAX_EXTENTS;
	if (ioctl(fd, FS_IOC_FIEMAP, fm) < 0)
		return -1;
	for (i = 0; i < fm->fm_mapped_extents; i++) {
		const struct fiemap_extent *e = &fm->fm_extents[i];
		uint64_t skip = (SZ_2M - e->fe_logical % SZ_2M) % SZ_2M;

		if (e->fe_length <= skip || (e->fe_physical + skip) % SZ_2M)
			continue;  /* logical and physical 2 MiB boundaries disagree: PTEs only */
		pieces += (e->fe_length - skip) / SZ_2M;
	}
	return pieces;
}

/*
 * Map `len` bytes of fd MAP_SHARED. With `pte`, at 4 KiB past a 2 MiB boundary: file offset 0
 * then sits at a different offset in its PMD than in the file's 2 MiB piece, so fs/dax.c
 * (dax_fault_check_fallback, "PMD colour") maps every page with its own 4 KiB fault -- the
 * comparison. Otherwise where the kernel chooses: ext4 gives DAX files
 * thp_get_unmapped_area, a 2 MiB-aligned address.
 */
static char *map_dax(int fd, size_t len, int pte)
{
	char *hole, *at;

	if (!pte)
		return mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	hole = mmap(NULL, len + 2 * SZ_2M, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (hole == MAP_FAILED)
		return hole;
	at = (char *)(((uintptr_t)hole + SZ_2M - 1) & ~(SZ_2M - 1)) + SZ_4K;
	return mmap(at, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
}

/* The first pass over a fresh mapping of fd: memset(p, c, len), timed, with the page faults it
 * took and the PMD faults that fell back to 4 KiB pages (-1: no VM_EVENT_COUNTERS). */
struct touch {
	uint64_t ns;
	long faults;
	long long fallback;
};

static struct touch first_touch(char *p, size_t len, int c)
{
	struct touch t;
	long long fallback = vmstat_counter("thp_fault_fallback");
	long faults = faults_so_far();
	uint64_t t0 = now_ns();

	memset(p, c, len);
	t.ns = now_ns() - t0;
	t.faults = faults_so_far() - faults;
	t.fallback = fallback < 0 ? -1 : vmstat_counter("thp_fault_fallback") - fallback;
	return t;
}

/*
 * dax-mmap:MiB[:pte]: fallocate a MiB-sized file on the DAX mount, map it MAP_SHARED and
 * write all of it: the "first-touch" line. The file's extents are unwritten, so each fault
 * also has the guest kernel zero the blocks it maps (ext4 converts them to written). Then
 * unmap it, map it again and write it again: the "map-touch" line, the faults of a mapping of
 * a file whose blocks are written (mapping only, no zeroing). Both lines say how the faults
 * went: pmd_ready= the 2 MiB pieces whose extent allows a PMD (of pieces=), faults= the page
 * faults the pass took (one per 2 MiB piece with PMD faults, one per 4 KiB page without), and
 * thp_fallback= the PMD faults the kernel turned into 4 KiB ones (/proc/vmstat; -1 when the
 * kernel keeps no event counters). A third pass over the same mapping, between the "begin"
 * and "end" lines, is plain stores to host memory: with DAX there should be no exit to the
 * VMM at all (count them with minivmm --trace). ":pte" forces 4 KiB faults (map_dax).
 */
static int step_dax_mmap(const char *arg)
{
	const char *mode = arg ? strchr(arg, ':') : NULL;
	int fd, pass, pte = mode && !strcmp(mode, ":pte");
	char num[16] = "";
	struct touch t;
	long mib, ready;
	uint64_t t1, t2;
	size_t len;
	char *p;

	if (arg)
		snprintf(num, sizeof num, "%.*s", mode ? (int)(mode - arg) : (int)strlen(arg), arg);
	mib = parse_count(num, 16);
	if (mib < 1 || (mode && !pte)) {
		say("dax-mmap FAILED: bad argument '%s' (MiB[:pte])", arg);
		return -1;
	}
	len = (size_t)mib << 20;
	fd = open(MNT "/minivmm-dax", O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0 || fallocate(fd, 0, 0, (off_t)len) < 0) {
		say("dax-mmap FAILED: " MNT "/minivmm-dax: %s", strerror(errno));
		return -1;
	}
	ready = pmd_ready_pieces(fd, len);
	for (pass = 0; pass < 2; pass++) {
		if (pass)
			munmap(p, len);
		p = map_dax(fd, len, pte);
		if (p == MAP_FAILED) {
			say("dax-mmap FAILED: mmap: %s", strerror(errno));
			close(fd);
			return -1;
		}
		t = first_touch(p, len, 0x11 * (pass + 1));
		say("dax-mmap %s mib=%ld ns=%llu map=%s addr_2m=%d pieces=%lu pmd_ready=%ld "
		    "faults=%ld thp_fallback=%lld", pass ? "map-touch" : "first-touch", mib,
		    (unsigned long long)t.ns, pte ? "pte" : "auto", (uintptr_t)p % SZ_2M == 0,
		    len / SZ_2M, ready, t.faults, t.fallback);
	}
	say("dax-mmap begin");
	t1 = now_ns();
	memset(p, 0x33, len);
	t2 = now_ns();
	say("dax-mmap end mib=%ld ns=%llu", mib, (unsigned long long)(t2 - t1));
	munmap(p, len);
	close(fd);
	unlink(MNT "/minivmm-dax");
	return 0;
}

/*
 * dax-store:FILE:PAGE:TEXT[:msync|:hold]: map page PAGE of FILE (existing, on a DAX mount)
 * MAP_SHARED and copy TEXT to its start: user-mode stores straight into the pmem. ":msync"
 * then msync(MS_SYNC)s the page (a virtio-pmem FLUSH); ":hold" says "dax-store holding" and
 * waits for the VMM to end the run, never flushing (exiting would: finish() syncs).
 * For the power-failure tests (tests/test_powerfail_boot.py).
 */
static int step_dax_store(const char *arg)
{
	char buf[256], *save = NULL, *file, *page_s, *text, *flag;
	long page;
	char *p;
	int fd, err = 0;

	snprintf(buf, sizeof buf, "%s", arg ? arg : "");
	file = strtok_r(buf, ":", &save);
	page_s = strtok_r(NULL, ":", &save);
	text = strtok_r(NULL, ":", &save);
	flag = strtok_r(NULL, ":", &save);
	page = page_s ? strtol(page_s, NULL, 10) : -1;
	if (!file || !text || page < 0 || strlen(text) > 4096) {
		say("dax-store FAILED: bad argument '%s' (FILE:PAGE:TEXT[:msync|:hold])", arg ? arg : "");
		return -1;
	}
	fd = open(file, O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		say("dax-store FAILED: %s: %s", file, strerror(errno));
		return -1;
	}
	p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)page * 4096);
	if (p == MAP_FAILED) {
		say("dax-store FAILED: mmap %s: %s", file, strerror(errno));
		close(fd);
		return -1;
	}
	memcpy(p, text, strlen(text));
	if (flag && !strcmp(flag, "msync") && msync(p, 4096, MS_SYNC) < 0)
		err = errno;
	munmap(p, 4096);
	close(fd);
	if (err) {
		say("dax-store FAILED: msync %s: %s", file, strerror(err));
		return -1;
	}
	say("dax-store file=%s page=%ld bytes=%zu flag=%s", file, page, strlen(text), flag ? flag : "none");
	if (flag && !strcmp(flag, "hold")) {
		say("dax-store holding");
		for (;;)
			pause();
	}
	return 0;
}

static int step_umount(const char *arg)
{
	(void)arg;
	sync();
	if (umount(MNT) < 0) {
		say("umount FAILED: " MNT ": %s", strerror(errno));
		return -1;
	}
	say("umount dir=" MNT);
	return 0;
}

/* fork-exec[:N]: N x (fork, execve /bin/true, waitpid); each child must exit 0. */
static int step_fork_exec(const char *arg)
{
	static char *const child_argv[] = { "/bin/true", NULL };
	static char *const child_envp[] = { "PATH=/sbin:/bin", NULL };
	long n = parse_count(arg, 100), i;
	uint64_t t0, t1;

	if (n < 0) {
		say("fork-exec FAILED: bad count '%s'", arg);
		return -1;
	}
	t0 = now_ns();
	for (i = 0; i < n; i++) {
		int status;
		pid_t pid = fork();

		if (pid < 0) {
			say("fork-exec FAILED: fork %ld of %ld: %s", i + 1, n, strerror(errno));
			return -1;
		}
		if (pid == 0) {
			execve(child_argv[0], child_argv, child_envp);
			_exit(127);
		}
		if (waitpid(pid, &status, 0) != pid) {
			say("fork-exec FAILED: waitpid %ld of %ld: %s", i + 1, n, strerror(errno));
			return -1;
		}
		if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
			say("fork-exec FAILED: cycle %ld of %ld: %s status 0x%x%s", i + 1, n,
			    child_argv[0], status,
			    WIFEXITED(status) && WEXITSTATUS(status) == 127 ? " (execve failed)" : "");
			return -1;
		}
	}
	t1 = now_ns();
	say("fork-exec n=%ld total_ns=%llu ns_per_cycle=%llu prog=%s", n,
	    (unsigned long long)(t1 - t0), (unsigned long long)((t1 - t0) / n),
	    child_argv[0]);
	return 0;
}

/*
 * The 8250 driver fails a port's startup when it cannot request the port's IRQ
 * (e.g. IRQ 4 has no mapping because the firmware says there is no legacy PIC).
 * The tty then answers every write and most ioctls with EIO, although printk
 * still reaches the UART.  TCGETS tells: EIO only in that state.
 */
static int tty_io_error(int fd)
{
	struct termios t;

	return tcgetattr(fd, &t) < 0 && errno == EIO;
}

static int open_tty(const char *dev)
{
	return open(dev, O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
}

/*
 * serial-poll[:DEV]: if DEV (/dev/ttyS0) fails with EIO, switch the port to
 * polled mode (irq 0, as `setserial DEV irq 0`) and check that it then works.
 * TIOCSSERIAL changes the IRQ only for the tty's sole user, and the port only
 * restarts cleanly on a first open, so every other open of the tty must be
 * closed first: as init, this step closes its own console descriptors (0-2
 * and the console) and reopens the console afterwards.
 */
static int step_serial_poll(const char *arg)
{
	const char *dev = arg && *arg ? arg : "/dev/ttyS0";
	struct serial_struct ss;
	int fd, old_irq, err = 0, rc = -1;
	const char *what = "";

	if (is_init) {
		if (console_fd >= 0)
			close(console_fd);
		console_fd = -1;
		for (fd = 0; fd < 3; fd++)
			close(fd);
	}
	fd = open_tty(dev);
	if (fd < 0) {
		err = errno;
		what = "open";
		goto out;
	}
	if (ioctl(fd, TIOCGSERIAL, &ss) < 0) {
		err = errno;
		what = "TIOCGSERIAL";
		goto out;
	}
	old_irq = ss.irq;
	if (!tty_io_error(fd)) {
		close(fd);
		fd = -1;
		rc = 0;
		what = ss.irq ? "irq" : "polled";
		goto out;
	}
	ss.irq = 0;
	if (ioctl(fd, TIOCSSERIAL, &ss) < 0) {
		err = errno;
		what = "TIOCSSERIAL irq=0";
		goto out;
	}
	/* Last close shuts the port down; the next open starts it without an IRQ. */
	close(fd);
	fd = open_tty(dev);
	if (fd < 0) {
		err = errno;
		what = "reopen";
		goto out;
	}
	if (ioctl(fd, TIOCGSERIAL, &ss) < 0 || ss.irq != 0 || tty_io_error(fd)) {
		err = EIO;
		what = "still failing after irq=0";
		goto out;
	}
	close(fd);
	fd = -1;
	rc = 1;
out:
	if (fd >= 0)
		close(fd);
	if (is_init) {
		int c = open("/dev/console", O_RDWR | O_NOCTTY);

		if (c >= 0) {	/* becomes 0; 1 and 2 follow */
			dup2(c, 1);
			dup2(c, 2);
		}
		console_fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
	}
	if (rc == 0)
		say("serial-poll dev=%s irq=%d mode=%s", dev, ss.irq, what);
	else if (rc == 1)
		say("serial-poll dev=%s irq=0 mode=polled (irq %d failed with EIO)", dev, old_irq);
	else
		say("serial-poll FAILED: %s: %s: %s", dev, what, strerror(err));
	return rc < 0 ? -1 : 0;
}

/*
 * tls-switch[:N]: two threads pass a byte back and forth N times through two
 * pipes, so every round trip is two context switches; after each blocking
 * read a thread checks that %fs still points at its own thread control block
 * (the x86-64 TLS ABI keeps the TCB's own address at %fs:0, musl's as glibc's)
 * and that its __thread variable still reads back.  Checks that the kernel
 * switches the FS base.
 */
static __thread unsigned long tls_marker;

struct tls_side {
	int in, out;
	long n, done, bad;
	unsigned long want, first_bad;
};

static unsigned long fs_word0(void)
{
	unsigned long v;

	__asm__ volatile("mov %%fs:0, %0" : "=r"(v));
	return v;
}

static void tls_side_loop(struct tls_side *t, int starts)
{
	char c = 'x';
	long i;

	t->want = fs_word0();
	tls_marker = t->want ^ 0x5a5a;
	for (i = 0; i < t->n; i++) {
		unsigned long fs0;

		if (starts && write(t->out, &c, 1) != 1)
			break;
		if (read(t->in, &c, 1) != 1)
			break;
		fs0 = fs_word0();
		if (fs0 != t->want || tls_marker != (t->want ^ 0x5a5a)) {
			if (!t->bad++)
				t->first_bad = fs0;
		}
		if (!starts && write(t->out, &c, 1) != 1)
			break;
		t->done++;
	}
}

static void *tls_side_thread(void *p)
{
	tls_side_loop(p, 0);
	return NULL;
}

static int step_tls_switch(const char *arg)
{
	long n = parse_count(arg, 200);
	struct tls_side a = { 0 }, b = { 0 };
	int ab[2], ba[2];
	pthread_t tid;

	if (n < 0) {
		say("tls-switch FAILED: bad count '%s'", arg);
		return -1;
	}
	if (pipe(ab) < 0 || pipe(ba) < 0) {
		say("tls-switch FAILED: pipe: %s", strerror(errno));
		return -1;
	}
	a.n = b.n = n;
	a.out = ab[1];
	b.in = ab[0];
	b.out = ba[1];
	a.in = ba[0];
	if (pthread_create(&tid, NULL, tls_side_thread, &b) != 0) {
		say("tls-switch FAILED: pthread_create");
		return -1;
	}
	tls_side_loop(&a, 1);
	pthread_join(tid, NULL);
	close(ab[0]);
	close(ab[1]);
	close(ba[0]);
	close(ba[1]);
	if (a.bad || b.bad || a.done != n || b.done != n) {
		say("tls-switch FAILED: n=%ld done=%ld/%ld bad=%ld/%ld fs0 want %#lx/%#lx, first bad %#lx/%#lx",
		    n, a.done, b.done, a.bad, b.bad, a.want, b.want, a.first_bad, b.first_bad);
		return -1;
	}
	say("tls-switch n=%ld bad=0 fs0=%#lx/%#lx", n, a.want, b.want);
	return 0;
}

static int step_end(const char *arg);

struct step {
	const char *name;
	int (*run)(const char *arg);
};

/* New steps are new rows; names are what minivmm.steps lists. */
static const struct step steps[] = {
	{ "hello", step_hello },
	{ "mounts", step_mounts },
	{ "getpid", step_getpid },
	{ "uname", step_uname },
	{ "sleep", step_sleep },
	{ "pmem-list", step_pmem_list },
	{ "pmem-mount", step_pmem_mount },
	{ "pmem-write", step_pmem_write },
	{ "pmem-read", step_pmem_read },
	{ "flush-bench", step_flush_bench },
	{ "flush-threads", step_flush_threads },
	{ "dax-mmap", step_dax_mmap },
	{ "dax-store", step_dax_store },
	{ "umount", step_umount },
	{ "fork-exec", step_fork_exec },
	{ "serial-poll", step_serial_poll },
	{ "tls-switch", step_tls_switch },
	{ "end", step_end },
};

static const struct step *find_step(const char *name, size_t len)
{
	size_t i;

	for (i = 0; i < sizeof steps / sizeof steps[0]; i++)
		if (strlen(steps[i].name) == len && !strncmp(steps[i].name, name, len))
			return &steps[i];
	return NULL;
}

/* ---- end of the run ---- */

static const char *end_action = "poweroff";
static int n_ok, n_failed;

static void finish(void)
{
	say("done ok=%d failed=%d", n_ok, n_failed);
	say("end action=%s", end_action);
	sync();
	/* Only init ends the machine: run from a shell, just exit. */
	if (!is_init)
		exit(n_failed ? 1 : 0);
	if (!strcmp(end_action, "reboot"))
		reboot(RB_AUTOBOOT);		/* LINUX_REBOOT_CMD_RESTART */
	else if (!strcmp(end_action, "poweroff"))
		reboot(RB_POWER_OFF);		/* LINUX_REBOOT_CMD_POWER_OFF */
	else if (!strcmp(end_action, "panic"))
		exit(7);			/* init exiting panics the kernel */
	/* pid 1 must not return: wait for the VMM to stop us. */
	if (strcmp(end_action, "none"))
		say("end FAILED: action %s did not stop the machine: %s",
		    end_action, strerror(errno));
	for (;;)
		pause();
}

static int step_end(const char *arg)
{
	if (arg && *arg)
		end_action = arg;
	finish();
	return 0;
}

/* Run one step token: NAME, NAME:ARG or NAME<digits>. */
static void run_token(const char *tok)
{
	const char *colon = strchr(tok, ':'), *arg = NULL;
	const struct step *s;
	size_t len;

	if (colon) {
		s = find_step(tok, colon - tok);
		arg = colon + 1;
	} else {
		len = strlen(tok);
		s = find_step(tok, len);
		if (!s) {
			while (len > 0 && tok[len - 1] >= '0' && tok[len - 1] <= '9')
				len--;
			arg = tok + len;
			s = len ? find_step(tok, len) : NULL;
		}
	}
	if (!s) {
		say("unknown step '%s'", tok);
		n_failed++;
		return;
	}
	if (s->run(arg) == 0)
		n_ok++;
	else
		n_failed++;
}

/* Value of "key=" in the kernel command line, copied into out. */
static int cmdline_value(const char *cmdline, const char *key, char *out, size_t size)
{
	size_t klen = strlen(key);
	const char *p = cmdline;

	while ((p = strstr(p, key)) != NULL) {
		if ((p == cmdline || p[-1] == ' ') && p[klen] == '=') {
			size_t n = strcspn(p + klen + 1, " \n");

			if (n >= size)
				n = size - 1;
			memcpy(out, p + klen + 1, n);
			out[n] = 0;
			return 1;
		}
		p += klen;
	}
	return 0;
}

int main(int argc, char **argv)
{
	static char cmdline[4096], list[2048], end[32];
	char *tok, *save;

	is_init = getpid() == 1;
	basic_mounts();
	if (is_init)
		console_fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
	if (read_small("/proc/cmdline", cmdline, sizeof cmdline) < 0)
		cmdline[0] = 0;
	if (cmdline_value(cmdline, "minivmm.end", end, sizeof end))
		end_action = end;
	else if (!is_init)
		end_action = "none";

	if (argc > 1) {		/* run from a shell: the arguments are the steps */
		list[0] = 0;
		for (int i = 1; i < argc; i++) {
			strncat(list, argv[i], sizeof list - strlen(list) - 2);
			strcat(list, ",");
		}
	} else if (!cmdline_value(cmdline, "minivmm.steps", list, sizeof list)) {
		strcpy(list, "hello,mounts,uname,getpid");
	}
	say("start pid=%d steps=%s end=%s", (int)getpid(), list, end_action);
	for (tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save))
		run_token(tok);
	finish();
	return 0;
}
