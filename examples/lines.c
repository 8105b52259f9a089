/* examples/lines.rs through the C ABI: each step mixes a state of N uint64_t words and appends
 * `step <i> <digest>` to an output file from sv_output (a FILE * the shim flushes at every
 * snapshot and cuts back on a resume). Same options, output file and last line,
 * `checksum <hex>`, as lines.rs, so the two agree byte for byte.
 *
 *   cc -O2 examples/lines.c -Ishim/capi/include target/release/libsupervise.a -lpthread -ldl -lm -o lines-c
 *   supervise --every 5s -- ./lines-c --n 4096 --steps 100000 --out lines.txt
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "supervise.h"

static int fail(const char *what) {
    fprintf(stderr, "lines.c: %s: %s\n", what, sv_last_error());
    return 1;
}

static uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

/* One step: every word mixed with its left neighbour and the step number. */
static uint64_t mix(uint64_t *state, size_t n, uint64_t step) {
    uint64_t prev = step * UINT64_C(0x9E3779B97F4A7C15), digest = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t v = rotl((state[i] ^ prev) * UINT64_C(0xBF58476D1CE4E5B9), 29) ^ step;
        state[i] = v;
        prev = v;
        digest ^= v;
    }
    return digest;
}

int main(int argc, char **argv) {
    size_t n = 4096;
    uint64_t steps = 20000, flush_every = 0, step = 0;
    const char *out = "lines.txt";
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && strcmp(argv[i], "--n") == 0) {
            n = strtoull(argv[++i], NULL, 10);
        } else if (i + 1 < argc && strcmp(argv[i], "--steps") == 0) {
            steps = strtoull(argv[++i], NULL, 10);
        } else if (i + 1 < argc && strcmp(argv[i], "--out") == 0) {
            out = argv[++i];
        } else if (i + 1 < argc && strcmp(argv[i], "--flush-every") == 0) {
            flush_every = strtoull(argv[++i], NULL, 10);
        } else {
            fprintf(stderr, "usage: lines-c [--n N] [--steps S] [--out FILE] [--flush-every K]\n");
            return 2;
        }
    }
    if (n == 0) {
        fprintf(stderr, "--n must be at least 1\n");
        return 2;
    }
    size_t bytes = n * sizeof(uint64_t);

    if (sv_init() != 0) return fail("sv_init");
    /* Filled from the snapshot when this run resumes, zeros otherwise. */
    uint64_t *state = sv_alloc("state", bytes);
    if (!state) return fail("sv_alloc");
    if (sv_protect("step", &step, sizeof step) != 0) return fail("sv_protect step");
    if (sv_is_restart() == 1) {
        if (sv_restore() != 0) return fail("sv_restore");
        fprintf(stderr, "lines.c: resumed at step %" PRIu64 "\n", step);
    } else {
        for (size_t i = 0; i < n; i++) state[i] = i;
    }
    /* Cut back to what it held at the snapshot (empty on a fresh start). The shim owns it:
     * no fclose. */
    FILE *f = sv_output(out);
    if (!f) return fail("sv_output");

    while (step < steps) {
        uint64_t digest = mix(state, n, step);
        step++;
        fprintf(f, "step %" PRIu64 " %016" PRIx64 "\n", step, digest);
        if (flush_every && step % flush_every == 0) fflush(f);
        if (sv_checkpoint_requested() == 1) {
            char tag[32];
            snprintf(tag, sizeof tag, "step %" PRIu64, step);
            int rc = sv_checkpoint(tag);
            if (rc == SV_STOP) /* asked to stop: the final snapshot is taken */
                return sv_finalize_stopped();
            if (rc != 0)
                fprintf(stderr, "lines.c: snapshot failed, continuing: %s\n", sv_last_error());
        }
    }
    char hex[65];
    if (sv_digest_hex(state, bytes, hex) != 0) return fail("sv_digest_hex");
    sv_finalize(); /* flushes and closes the output file */
    printf("checksum %s\n", hex);
    return 0;
}
