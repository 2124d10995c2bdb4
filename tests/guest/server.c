/* The test guest's server, built static and run as the guest's only program.
 *
 *   TCP 7:  echo.
 *   TCP 80: one request per line, one answer per line, on a kept-open
 *           connection (or HTTP-ish "GET /path" lines from curl-like tools):
 *             count          -> the number of requests served so far
 *             set KEY VALUE  -> "ok" (a key-value store in memory)
 *             get KEY        -> the value, or "none"
 *             dump           -> every "KEY=VALUE" in key order, then the count
 *             random         -> a random number (differs between replicas:
 *                               frame-level replication cannot make it agree)
 *             time           -> the guest's clock in ns (differs likewise)
 *             dial A.B.C.D P -> the guest connects out to A.B.C.D:P itself and
 *                               answers "dialed: " and the first line it
 *                               read there (or "dial failed: why"); the
 *                               server waits for it (5 s at most)
 *           (both answers are also written to the console, to compare)
 *
 * Every request on 80 is also written to the console ("falcon guest:
 * request N: LINE"), so a test can compare what each replica's guest served
 * even where the guest's answers are dropped (backups).
 *
 * Single-threaded, poll(2) over every connection, bounded buffers. */
#define _GNU_SOURCE
#include <errno.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXC 64
#define BUF 4096
#define KEYS 1024

struct conn { int fd; int echo; char in[BUF]; size_t n; };
static struct conn conns[MAXC];
static char *keys[KEYS], *vals[KEYS];
static int nkeys;
static unsigned long long served;

static int listen_on(int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 64) < 0) { perror("listen"); exit(1); }
    return s;
}

static void put(int fd, const char *s) {
    size_t n = strlen(s);
    while (n > 0) { ssize_t w = write(fd, s, n); if (w <= 0) return; s += w; n -= (size_t)w; }
}

static int cmp(const void *a, const void *b) {
    return strcmp(keys[*(const int *)a], keys[*(const int *)b]);
}

static void answer(int fd, char *line) {
    char out[BUF];
    if (!strncmp(line, "GET /", 5)) { line += 5; char *sp = strchr(line, ' '); if (sp) *sp = 0; for (char *p = line; *p; p++) if (*p == '/') *p = ' '; }
    served++;
    printf("falcon guest: request %llu: %s\n", served, line);
    fflush(stdout);
    if (!strcmp(line, "count")) { snprintf(out, sizeof out, "%llu\n", served); put(fd, out); }
    else if (!strncmp(line, "set ", 4)) {
        char *k = line + 4, *v = strchr(k, ' ');
        if (!v) { put(fd, "error: set KEY VALUE\n"); return; }
        *v++ = 0;
        for (int i = 0; i < nkeys; i++) if (!strcmp(keys[i], k)) { free(vals[i]); vals[i] = strdup(v); put(fd, "ok\n"); return; }
        if (nkeys == KEYS) { put(fd, "error: full\n"); return; }
        keys[nkeys] = strdup(k); vals[nkeys++] = strdup(v); put(fd, "ok\n");
    } else if (!strncmp(line, "get ", 4)) {
        for (int i = 0; i < nkeys; i++) if (!strcmp(keys[i], line + 4)) { snprintf(out, sizeof out, "%s\n", vals[i]); put(fd, out); return; }
        put(fd, "none\n");
    } else if (!strcmp(line, "dump")) {
        int idx[KEYS];
        for (int i = 0; i < nkeys; i++) idx[i] = i;
        qsort(idx, (size_t)nkeys, sizeof idx[0], cmp);
        for (int i = 0; i < nkeys; i++) { snprintf(out, sizeof out, "%s=%s\n", keys[idx[i]], vals[idx[i]]); put(fd, out); }
        snprintf(out, sizeof out, "count=%llu\n", served); put(fd, out);
    } else if (!strcmp(line, "random")) {
        unsigned long long r = 0; if (getrandom(&r, sizeof r, 0) < 0) r = 0;
        snprintf(out, sizeof out, "%llu\n", r); put(fd, out);
        printf("falcon guest: answer to random: %s", out); fflush(stdout);
    } else if (!strcmp(line, "time")) {
        struct timespec t; clock_gettime(CLOCK_REALTIME, &t);
        snprintf(out, sizeof out, "%lld\n", (long long)t.tv_sec * 1000000000LL + t.tv_nsec); put(fd, out);
        printf("falcon guest: answer to time: %s", out); fflush(stdout);
    } else if (!strncmp(line, "dial ", 5)) {
        char host[64]; int port;
        struct sockaddr_in a = { .sin_family = AF_INET };
        if (sscanf(line + 5, "%63s %d", host, &port) != 2 || inet_pton(AF_INET, host, &a.sin_addr) != 1) { put(fd, "dial failed: usage: dial A.B.C.D PORT\n"); return; }
        a.sin_port = htons((unsigned short)port);
        int s = socket(AF_INET, SOCK_STREAM, 0);
        struct timeval tv = { .tv_sec = 5 };
        setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        char got[128]; size_t n = 0;
        if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) { snprintf(out, sizeof out, "dial failed: connect: %s\n", strerror(errno)); put(fd, out); close(s); return; }
        while (n < sizeof got - 1) { ssize_t r = read(s, got + n, 1); if (r <= 0 || got[n] == '\n') break; n++; }
        got[n] = 0;
        close(s);
        snprintf(out, sizeof out, "dialed: %s\n", got); put(fd, out);
        printf("falcon guest: answer to dial: %s\n", got); fflush(stdout);
    } else put(fd, "error: count | set KEY VALUE | get KEY | dump | random | time | dial A.B.C.D PORT\n");
}

int main(void) {
    int ls[2] = { listen_on(7), listen_on(80) };
    printf("falcon guest: listening on 7 and 80\n");
    fflush(stdout);
    for (;;) {
        struct pollfd p[2 + MAXC];
        int n = 0, map[MAXC];
        p[n++] = (struct pollfd){ .fd = ls[0], .events = POLLIN };
        p[n++] = (struct pollfd){ .fd = ls[1], .events = POLLIN };
        for (int i = 0; i < MAXC; i++) if (conns[i].fd > 0) { map[n - 2] = i; p[n++] = (struct pollfd){ .fd = conns[i].fd, .events = POLLIN }; }
        if (poll(p, (nfds_t)n, -1) < 0) { if (errno == EINTR) continue; perror("poll"); return 1; }
        for (int l = 0; l < 2; l++) if (p[l].revents & POLLIN) {
            int fd = accept(ls[l], 0, 0);
            if (fd < 0) continue;
            int i = 0; while (i < MAXC && conns[i].fd > 0) i++;
            if (i == MAXC) { close(fd); continue; }
            conns[i] = (struct conn){ .fd = fd, .echo = l == 0 };
        }
        for (int j = 2; j < n; j++) {
            if (!(p[j].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            struct conn *c = &conns[map[j - 2]];
            ssize_t r = read(c->fd, c->in + c->n, BUF - 1 - c->n);
            if (r <= 0) { close(c->fd); c->fd = 0; continue; }
            if (c->echo) {
                for (ssize_t done = 0; done < r;) { ssize_t w = write(c->fd, c->in + done, (size_t)(r - done)); if (w <= 0) break; done += w; }
                continue;
            }
            c->n += (size_t)r;
            c->in[c->n] = 0;
            char *nl;
            while ((nl = memchr(c->in, '\n', c->n))) {
                *nl = 0;
                if (nl > c->in && nl[-1] == '\r') nl[-1] = 0;
                answer(c->fd, c->in);
                size_t used = (size_t)(nl + 1 - c->in);
                memmove(c->in, nl + 1, c->n - used);
                c->n -= used;
                c->in[c->n] = 0;
            }
            if (c->n == BUF - 1) { close(c->fd); c->fd = 0; }
        }
    }
}
