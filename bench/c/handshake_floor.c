/* OpenSSL's C floor for one TLS 1.3 handshake, both ends in this process.
 *
 * Built at run time by bench/handshake_rate.py (cc ... -lssl -lcrypto) and run next to ktlsd
 * on the same machine, so the two figures share the same libssl, kernel and load.
 *
 *   handshake_floor x509 N CERT KEY CAFILE   ECDSA (or RSA) server cert, client verifies the
 *                                            chain against CAFILE and the name "localhost"
 *   handshake_floor psk N                    external PSK (SHA-256, TLS_AES_128_GCM_SHA256)
 *
 * With KTLSD_FLOOR_KEYLOG=1 in the environment both contexts get a keylog callback that keeps
 * the two application traffic secrets, as any kTLS agent on OpenSSL 3.0 must (the only way to
 * get them; OpenSSL formats all five secrets per end as hex for it); with KTLSD_FLOOR_INSIDE=1
 * the CPU time spent inside SSL_do_handshake is measured too (CLOCK_THREAD_CPUTIME_ID around
 * each call, which costs a little) and printed as "inside_us_per_handshake <f>".
 *
 * One end only, against a peer in another process (KTLSD_FLOOR_END): "server" prints
 * "port <n>", then accepts N+20 connections on it; "client:<port>" connects N+20 times. Each
 * connection: blocking SSL_accept / SSL_connect, SSL_free, close. The last line gives this
 * process's CPU per handshake over the last N (connecting and closing included).
 *
 * Each handshake runs on a fresh TCP loopback connection made beforehand (connections are made
 * and closed 100 at a time, outside the measured spans): SSL_new on both ends over the sockets
 * (non-blocking), SSL_do_handshake on client and server in turn until both are done, SSL_free.
 * The same work bench/handshake_rate.py gives ktlsd, with TLS 1.3 only and no session
 * tickets, as ktlsd's server sends none. The SSL_CTXs are built once.
 *
 * Prints one line: "cpu_us_per_handshake <f> wall_us_per_handshake <f> handshakes <n>", where
 * CPU is getrusage(RUSAGE_SELF) user + system time over the N handshakes (after a warm-up).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const unsigned char psk_identity[] = "bench-host";
static unsigned char psk_key[32];

static void die(const char *what)
{
    fprintf(stderr, "handshake_floor: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(1);
}

static SSL_SESSION *psk_session(SSL *ssl)
{
    const unsigned char code[2] = {0x13, 0x01}; /* TLS_AES_128_GCM_SHA256 */
    const SSL_CIPHER *cipher = SSL_CIPHER_find(ssl, code);
    SSL_SESSION *sess = SSL_SESSION_new();
    if (!cipher || !sess || !SSL_SESSION_set1_master_key(sess, psk_key, sizeof psk_key) ||
        !SSL_SESSION_set_cipher(sess, cipher) ||
        !SSL_SESSION_set_protocol_version(sess, TLS1_3_VERSION))
        die("cannot build the PSK session");
    return sess;
}

static int use_psk(SSL *ssl, const EVP_MD *md, const unsigned char **id, size_t *idlen,
                   SSL_SESSION **sess)
{
    (void)md;
    *sess = psk_session(ssl);
    *id = psk_identity;
    *idlen = sizeof psk_identity - 1;
    return 1;
}

static int find_psk(SSL *ssl, const unsigned char *id, size_t idlen, SSL_SESSION **sess)
{
    *sess = NULL;
    if (idlen == sizeof psk_identity - 1 && memcmp(id, psk_identity, idlen) == 0)
        *sess = psk_session(ssl);
    return 1;
}

/* What an agent on OpenSSL 3.0 must do to get the traffic secrets for kTLS: the keylog
 * callback is the only way, and OpenSSL formats every secret as hex for it. This one keeps the
 * two application traffic secrets (label compared, hex decoded) and ignores the other lines. */
static unsigned char traffic_secrets[2][64];

static int hex_value(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

static void keylog(const SSL *ssl, const char *line)
{
    static const char *labels[2] = {"CLIENT_TRAFFIC_SECRET_0 ", "SERVER_TRAFFIC_SECRET_0 "};
    (void)ssl;
    for (int which = 0; which < 2; which++) {
        size_t n = strlen(labels[which]);
        if (strncmp(line, labels[which], n) != 0)
            continue;
        const char *secret = strchr(line + n, ' '); /* after the client random */
        if (!secret)
            return;
        secret++;
        for (size_t i = 0; i < sizeof traffic_secrets[which]; i++) {
            int hi = hex_value(secret[2 * i]), lo = hi < 0 ? -1 : hex_value(secret[2 * i + 1]);
            if (lo < 0)
                break;
            traffic_secrets[which][i] = (unsigned char)(hi << 4 | lo);
        }
        return;
    }
}

static SSL_CTX *context(int server)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_method());
    if (!ctx || !SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) ||
        !SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION))
        die("SSL_CTX_new");
    SSL_CTX_set_mode(ctx, SSL_MODE_NO_AUTO_CHAIN);
    if (getenv("KTLSD_FLOOR_KEYLOG"))
        SSL_CTX_set_keylog_callback(ctx, keylog);
    if (server && !SSL_CTX_set_num_tickets(ctx, 0))
        die("SSL_CTX_set_num_tickets");
    return ctx;
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
           (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static double inside; /* CPU seconds inside SSL_do_handshake, when measured */
static int measure_inside;

static double thread_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double wall_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int step(SSL *ssl, int *done)
{
    if (*done)
        return 0;
    double t0 = measure_inside ? thread_seconds() : 0;
    int ret = SSL_do_handshake(ssl);
    if (measure_inside)
        inside += thread_seconds() - t0;
    if (ret == 1) {
        *done = 1;
        return 0;
    }
    int err = SSL_get_error(ssl, ret);
    if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE)
        die("handshake failed");
    return 1;
}

/* A TCP loopback connection: *c the connecting end, *s the accepted end, both non-blocking. */
static void connect_pair(int listener, const struct sockaddr_in *addr, int *c, int *s)
{
    *c = socket(AF_INET, SOCK_STREAM, 0);
    if (*c < 0 || connect(*c, (const struct sockaddr *)addr, sizeof *addr) != 0)
        die("connect");
    *s = accept(listener, NULL, NULL);
    if (*s < 0)
        die("accept");
    fcntl(*c, F_SETFL, O_NONBLOCK);
    fcntl(*s, F_SETFL, O_NONBLOCK);
}

static void handshake(int c, int s, SSL_CTX *cctx, SSL_CTX *sctx, int x509)
{
    SSL *cs = SSL_new(cctx), *ss = SSL_new(sctx);
    if (!cs || !ss || !SSL_set_fd(cs, c) || !SSL_set_fd(ss, s))
        die("SSL_new");
    if (x509 && !SSL_set1_host(cs, "localhost"))
        die("SSL_set1_host");
    SSL_set_connect_state(cs);
    SSL_set_accept_state(ss);
    int cdone = 0, sdone = 0;
    while (!cdone || !sdone) {
        step(cs, &cdone);
        step(ss, &sdone);
    }
    SSL_free(cs);
    SSL_free(ss);
}

#define BATCH 100

/* n handshakes on connections made beforehand, BATCH at a time: returns the CPU seconds spent
 * in the handshakes alone (connecting and closing are outside the measured spans). */
static double run(int listener, const struct sockaddr_in *addr, SSL_CTX *cctx, SSL_CTX *sctx,
                  int x509, long n, double *wall)
{
    int c[BATCH], s[BATCH];
    double cpu = 0;
    *wall = 0;
    for (long done = 0; done < n;) {
        int batch = n - done < BATCH ? (int)(n - done) : BATCH;
        for (int i = 0; i < batch; i++)
            connect_pair(listener, addr, &c[i], &s[i]);
        double cpu0 = cpu_seconds(), wall0 = wall_seconds();
        for (int i = 0; i < batch; i++)
            handshake(c[i], s[i], cctx, sctx, x509);
        cpu += cpu_seconds() - cpu0;
        *wall += wall_seconds() - wall0;
        for (int i = 0; i < batch; i++) {
            close(c[i]);
            close(s[i]);
        }
        done += batch;
    }
    return cpu;
}

/* One end of n handshakes against a peer process: see the header. */
static void one_end(const char *end, SSL_CTX *cctx, SSL_CTX *sctx, int x509, long n)
{
    int server = strcmp(end, "server") == 0;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    int listener = -1;
    if (server) {
        listener = socket(AF_INET, SOCK_STREAM, 0);
        if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0 ||
            listen(listener, 64) != 0 || getsockname(listener, (struct sockaddr *)&addr, &len))
            die("listen");
        printf("port %d\n", ntohs(addr.sin_port));
        fflush(stdout);
    } else if (strncmp(end, "client:", 7) == 0) {
        addr.sin_port = htons((unsigned short)atoi(end + 7));
    } else {
        die("KTLSD_FLOOR_END must be server or client:PORT");
    }
    double cpu0 = 0;
    for (long i = 0; i < n + 20; i++) {
        if (i == 20)
            cpu0 = cpu_seconds();
        int fd = server ? accept(listener, NULL, NULL) : socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0 || (!server && connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0))
            die("connect/accept");
        SSL *ssl = SSL_new(server ? sctx : cctx);
        if (!ssl || !SSL_set_fd(ssl, fd) || (!server && x509 && !SSL_set1_host(ssl, "localhost")))
            die("SSL_new");
        if ((server ? SSL_accept(ssl) : SSL_connect(ssl)) != 1)
            die("handshake failed");
        SSL_free(ssl);
        close(fd);
    }
    printf("cpu_us_per_handshake %.1f handshakes %ld\n", (cpu_seconds() - cpu0) * 1e6 / n, n);
}

int main(int argc, char **argv)
{
    if (argc < 3)
        die("usage: handshake_floor x509 N CERT KEY CAFILE | psk N");
    int x509 = strcmp(argv[1], "x509") == 0;
    long n = strtol(argv[2], NULL, 10);
    if ((x509 && argc != 6) || (!x509 && strcmp(argv[1], "psk") != 0) || n <= 0)
        die("usage: handshake_floor x509 N CERT KEY CAFILE | psk N");
    for (size_t i = 0; i < sizeof psk_key; i++)
        psk_key[i] = (unsigned char)i;

    SSL_CTX *sctx = context(1), *cctx = context(0);
    if (x509) {
        if (SSL_CTX_use_certificate_chain_file(sctx, argv[3]) != 1 ||
            SSL_CTX_use_PrivateKey_file(sctx, argv[4], SSL_FILETYPE_PEM) != 1 ||
            SSL_CTX_load_verify_locations(cctx, argv[5], NULL) != 1)
            die("cannot load the certificate, key or CA file");
        SSL_CTX_set_verify(cctx, SSL_VERIFY_PEER, NULL);
    } else {
        if (!SSL_CTX_set_ciphersuites(sctx, "TLS_AES_128_GCM_SHA256") ||
            !SSL_CTX_set_ciphersuites(cctx, "TLS_AES_128_GCM_SHA256"))
            die("SSL_CTX_set_ciphersuites");
        SSL_CTX_set_psk_find_session_callback(sctx, find_psk);
        SSL_CTX_set_psk_use_session_callback(cctx, use_psk);
    }

    if (getenv("KTLSD_FLOOR_END")) {
        one_end(getenv("KTLSD_FLOOR_END"), cctx, sctx, x509, n);
        return 0;
    }
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0 ||
        listen(listener, 64) != 0 || getsockname(listener, (struct sockaddr *)&addr, &len) != 0)
        die("listen");

    double wall;
    measure_inside = getenv("KTLSD_FLOOR_INSIDE") != NULL;
    run(listener, &addr, cctx, sctx, x509, 20, &wall); /* warm-up, as ktlsd's bench has */
    inside = 0;
    double cpu = run(listener, &addr, cctx, sctx, x509, n, &wall);
    printf("cpu_us_per_handshake %.1f wall_us_per_handshake %.1f handshakes %ld", cpu * 1e6 / n,
           wall * 1e6 / n, n);
    if (measure_inside)
        printf(" inside_us_per_handshake %.1f", inside * 1e6 / n);
    printf("\n");
    SSL_CTX_free(sctx);
    SSL_CTX_free(cctx);
    close(listener);
    return 0;
}
