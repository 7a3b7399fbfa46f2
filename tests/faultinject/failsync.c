/*
 * failsync: an LD_PRELOAD shim that makes exactly one fdatasync()/fsync() fail with EIO.
 *
 * Armed by a trigger file: while the file named by $AGENTSTATEFS_FAILSYNC_TRIGGER exists,
 * the next sync call removes it and returns -1 with errno = EIO, without syncing (as if
 * the device had failed the writeback). unlink() is atomic, so exactly one call fails
 * even when several threads sync at once; every other call goes to the real function.
 *
 * Optional: $AGENTSTATEFS_FAILSYNC_MATCH restricts the fault to descriptors whose path
 * (readlink /proc/self/fd/N) contains that string, e.g. "/agentstatefs/journal/".
 * Each injected fault is reported on stderr ("failsync: ...").
 *
 * Build: gcc -shared -fPIC -O2 -Wall -o failsync.so failsync.c -ldl
 * Use:   LD_PRELOAD=$PWD/failsync.so AGENTSTATEFS_FAILSYNC_TRIGGER=/tmp/t prog; touch /tmp/t
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int (*sync_fn)(int);

static sync_fn real(const char *name)
{
    sync_fn f = (sync_fn)dlsym(RTLD_NEXT, name);
    if (f == NULL) {
        static const char msg[] = "failsync: dlsym(RTLD_NEXT) failed\n";
        ssize_t r = write(2, msg, sizeof msg - 1);
        (void)r;
        abort();
    }
    return f;
}

static int inject(const char *call, int fd)
{
    const char *trigger = getenv("AGENTSTATEFS_FAILSYNC_TRIGGER");
    const char *match = getenv("AGENTSTATEFS_FAILSYNC_MATCH");
    char link[64], target[4096];
    ssize_t n;
    int saved = errno;

    if (trigger == NULL || *trigger == '\0')
        return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, target, sizeof target - 1);
    target[n < 0 ? 0 : n] = '\0';
    if (match != NULL && *match != '\0' && strstr(target, match) == NULL) {
        errno = saved;
        return 0;
    }
    if (unlink(trigger) != 0) {   /* not armed, or another thread took it */
        errno = saved;
        return 0;
    }
    {
        char msg[4300];
        int len = snprintf(msg, sizeof msg, "failsync: injected EIO into %s(%d) on %s (pid %d)\n",
                           call, fd, target, (int)getpid());
        if (len > 0) {
            ssize_t r = write(2, msg, (size_t)len < sizeof msg ? (size_t)len : sizeof msg - 1);
            (void)r;
        }
    }
    errno = EIO;
    return 1;
}

int fdatasync(int fd)
{
    static sync_fn next;
    if (inject("fdatasync", fd))
        return -1;
    if (next == NULL)
        next = real("fdatasync");
    return next(fd);
}

int fsync(int fd)
{
    static sync_fn next;
    if (inject("fsync", fd))
        return -1;
    if (next == NULL)
        next = real("fsync");
    return next(fd);
}
