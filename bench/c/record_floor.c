/* The C floor for ktlsd's user-space record layer: TLS 1.3 records over a socket pair.
 *
 * Built at run time by bench/record_throughput.py (cc ... -lssl -lcrypto -lpthread) and run
 * next to ktlsd, so both figures share the same libcrypto, kernel and load.
 *
 *   record_floor SUITE MIB      SUITE: aes128gcm | aes256gcm | chacha20
 *
 * Does what the Python benchmark asks of ktlsd: a writer thread hands 1 MiB blobs to the record
 * layer, which cuts them into 16 KiB records (TLS 1.3 inner plaintext: data + content type),
 * seals each with OpenSSL's EVP AEAD (nonce = write IV xor sequence number, additional data =
 * the record header) into one buffer and writes it to an AF_UNIX socket pair; a reader thread
 * reads whatever is there into a 256 KiB buffer and opens every complete record in place. The
 * keys are random: both ends share them, as after a handshake.
 *
 * Prints one line: "mb_per_cpu_second <f> cpu_seconds <f> bytes <n> aead_mb_per_cpu_second
 * <f>", where CPU is getrusage(RUSAGE_SELF) user + system time of the whole transfer (both
 * threads); the last figure is the bare AEAD: sealing 16 KiB records in a loop, nothing else.
 */
#define _GNU_SOURCE
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define BLOB (1 << 20)
#define RECORD (1 << 14)
#define TAG 16
#define HEADER 5
#define READ_BUFFER (1 << 18)

static const EVP_CIPHER *cipher;
static unsigned char key[32], iv[12];
static long long total;

static void die(const char *what)
{
    fprintf(stderr, "record_floor: %s\n", what);
    exit(1);
}

static void nonce(uint64_t seq, unsigned char out[12])
{
    memcpy(out, iv, 12);
    for (int i = 0; i < 8; i++)
        out[11 - i] ^= (unsigned char)(seq >> (8 * i));
}

static void *writer(void *arg)
{
    int fd = *(int *)arg;
    unsigned char *blob = malloc(BLOB);
    unsigned char *out = malloc(BLOB / RECORD * (RECORD + 1 + TAG + HEADER));
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!blob || !out || !ctx || !EVP_EncryptInit_ex(ctx, cipher, NULL, key, NULL))
        die("writer setup");
    RAND_bytes(blob, BLOB);
    uint64_t seq = 0;
    for (long long sent = 0; sent < total; sent += BLOB) {
        size_t len = 0;
        for (size_t off = 0; off < BLOB; off += RECORD) {
            unsigned char *rec = out + len, n[12];
            size_t inner = RECORD + 1;
            rec[0] = 23, rec[1] = 3, rec[2] = 3;
            rec[3] = (unsigned char)((inner + TAG) >> 8), rec[4] = (unsigned char)(inner + TAG);
            memcpy(rec + HEADER, blob + off, RECORD);
            rec[HEADER + RECORD] = 23; /* the content type ends the inner plaintext */
            int outl;
            nonce(seq++, n);
            if (!EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, n) ||
                !EVP_EncryptUpdate(ctx, NULL, &outl, rec, HEADER) ||
                !EVP_EncryptUpdate(ctx, rec + HEADER, &outl, rec + HEADER, (int)inner) ||
                !EVP_EncryptFinal_ex(ctx, rec + HEADER + inner, &outl) ||
                !EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG, rec + HEADER + inner))
                die("seal");
            len += HEADER + inner + TAG;
        }
        for (size_t done = 0; done < len;) {
            ssize_t w = write(fd, out + done, len - done);
            if (w <= 0)
                die("write");
            done += (size_t)w;
        }
    }
    shutdown(fd, SHUT_WR);
    EVP_CIPHER_CTX_free(ctx);
    free(blob);
    free(out);
    return NULL;
}

static double cpu_now(void)
{
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + r.ru_stime.tv_sec + (r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6;
}

/* MB per CPU-second of sealing 16 KiB (+1 byte) records, the AEAD alone. */
static double bare_aead(void)
{
    static unsigned char in[RECORD + 1], out[RECORD + 1 + TAG], n[12];
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!ctx || !EVP_EncryptInit_ex(ctx, cipher, NULL, key, NULL))
        die("aead setup");
    int rounds = 4096, outl;
    double t0 = cpu_now();
    for (int i = 0; i < rounds; i++) {
        nonce((uint64_t)i, n);
        if (!EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, n) ||
            !EVP_EncryptUpdate(ctx, NULL, &outl, in, HEADER) ||
            !EVP_EncryptUpdate(ctx, out, &outl, in, RECORD + 1) ||
            !EVP_EncryptFinal_ex(ctx, out + outl, &outl) ||
            !EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG, out + RECORD + 1))
            die("seal");
    }
    double spent = cpu_now() - t0;
    EVP_CIPHER_CTX_free(ctx);
    return (double)rounds * (RECORD + 1) / spent / 1e6;
}

int main(int argc, char **argv)
{
    if (argc != 3)
        die("usage: record_floor aes128gcm|aes256gcm|chacha20 MIB");
    if (strcmp(argv[1], "aes128gcm") == 0)
        cipher = EVP_aes_128_gcm();
    else if (strcmp(argv[1], "aes256gcm") == 0)
        cipher = EVP_aes_256_gcm();
    else if (strcmp(argv[1], "chacha20") == 0)
        cipher = EVP_chacha20_poly1305();
    else
        die("unknown suite");
    total = atoll(argv[2]) * (long long)BLOB;
    RAND_bytes(key, sizeof key);
    RAND_bytes(iv, sizeof iv);

    int fds[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0)
        die("socketpair");
    struct rusage r0, r1;
    getrusage(RUSAGE_SELF, &r0);
    pthread_t thread;
    if (pthread_create(&thread, NULL, writer, &fds[0]) != 0)
        die("pthread_create");

    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    unsigned char *buf = malloc(READ_BUFFER);
    if (!ctx || !buf || !EVP_DecryptInit_ex(ctx, cipher, NULL, key, NULL))
        die("reader setup");
    size_t have = 0;
    long long got = 0;
    uint64_t seq = 0;
    for (;;) {
        ssize_t r = read(fds[1], buf + have, READ_BUFFER - have);
        if (r < 0)
            die("read");
        if (r == 0)
            break;
        have += (size_t)r;
        size_t off = 0;
        while (have - off >= HEADER) {
            unsigned char *rec = buf + off, n[12];
            size_t length = ((size_t)rec[3] << 8) | rec[4];
            if (have - off < HEADER + length)
                break;
            int outl;
            size_t inner = length - TAG;
            nonce(seq++, n);
            if (!EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, n) ||
                !EVP_DecryptUpdate(ctx, NULL, &outl, rec, HEADER) ||
                !EVP_DecryptUpdate(ctx, rec + HEADER, &outl, rec + HEADER, (int)inner) ||
                !EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG, rec + HEADER + inner) ||
                EVP_DecryptFinal_ex(ctx, rec + HEADER + inner, &outl) <= 0)
                die("open: authentication failed");
            while (inner > 0 && rec[HEADER + inner - 1] == 0)
                inner--; /* padding */
            if (inner == 0 || rec[HEADER + inner - 1] != 23)
                die("open: not application data");
            got += (long long)inner - 1;
            off += HEADER + length;
        }
        memmove(buf, buf + off, have - off);
        have -= off;
    }
    pthread_join(thread, NULL);
    getrusage(RUSAGE_SELF, &r1);
    if (got != total)
        die("lost data");
    double cpu = (r1.ru_utime.tv_sec - r0.ru_utime.tv_sec) + (r1.ru_stime.tv_sec - r0.ru_stime.tv_sec) +
                 ((r1.ru_utime.tv_usec - r0.ru_utime.tv_usec) +
                  (r1.ru_stime.tv_usec - r0.ru_stime.tv_usec)) / 1e6;
    printf("mb_per_cpu_second %.1f cpu_seconds %.3f bytes %lld aead_mb_per_cpu_second %.1f\n",
           got / cpu / 1e6, cpu, got, bare_aead());
    EVP_CIPHER_CTX_free(ctx);
    free(buf);
    return 0;
}
