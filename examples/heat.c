/* A 2-D heat-equation solver on an N x N grid of doubles, made restartable with the supervise
 * shim through its C ABI. The same algorithm, options and last line as examples/heat.rs:
 * `checksum <hex>` (blake3 of the final grid's bytes), so the two agree.
 *
 *   cc -O2 examples/heat.c -Ishim/capi/include target/release/libsupervise.a -lpthread -ldl -lm -o heat-c
 *   supervise --every 5s -- ./heat-c --n 2048 --steps 5400
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "supervise.h"

static int fail(const char *what) {
    fprintf(stderr, "heat.c: %s: %s\n", what, sv_last_error());
    return 1;
}

int main(int argc, char **argv) {
    size_t n = 2048;
    uint64_t steps = 5400, step = 0;
    const double alpha = 0.2;
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && strcmp(argv[i], "--n") == 0) {
            n = strtoull(argv[++i], NULL, 10);
        } else if (i + 1 < argc && strcmp(argv[i], "--steps") == 0) {
            steps = strtoull(argv[++i], NULL, 10);
        } else {
            fprintf(stderr, "usage: heat-c [--n N] [--steps S]\n");
            return 2;
        }
    }
    if (n < 3) {
        fprintf(stderr, "--n must be at least 3\n");
        return 2;
    }
    size_t bytes = n * n * sizeof(double);
    double *grid = calloc(n * n, sizeof(double));
    double *next = calloc(n * n, sizeof(double));
    if (!grid || !next) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    for (size_t j = 0; j < n; j++) grid[j] = 100.0;

    /* 1. Start the shim, register the state, restore it when this run resumes. */
    if (sv_init() != 0) return fail("sv_init");
    if (sv_protect("grid", grid, bytes) != 0) return fail("sv_protect grid");
    if (sv_protect("step", &step, sizeof step) != 0) return fail("sv_protect step");
    if (sv_is_restart() == 1) {
        if (sv_restore() != 0) return fail("sv_restore");
        fprintf(stderr, "heat.c: resumed at step %llu\n", (unsigned long long)step);
    }
    memcpy(next, grid, bytes);

    while (step < steps) {
        for (size_t i = 1; i + 1 < n; i++) {
            const double *up = grid + (i - 1) * n, *mid = grid + i * n, *down = grid + (i + 1) * n;
            double *row = next + i * n;
            row[0] = mid[0];
            row[n - 1] = mid[n - 1];
            for (size_t j = 1; j + 1 < n; j++)
                row[j] = mid[j] + alpha * (up[j] + down[j] + mid[j - 1] + mid[j + 1] - 4.0 * mid[j]);
        }
        double *t = grid;
        grid = next;
        next = t;
        step++;
        /* 2. At a safe point: one atomic load unless a snapshot is due. The grid moved
         * (buffers swap each step): register where it is now, then take the snapshot. */
        if (sv_checkpoint_requested() == 1) {
            char tag[32];
            snprintf(tag, sizeof tag, "step %llu", (unsigned long long)step);
            int rc = sv_protect("grid", grid, bytes);
            if (rc == 0) rc = sv_checkpoint(tag);
            if (rc == SV_STOP) { /* asked to stop: the final snapshot is taken */
                free(grid);
                free(next);
                return sv_finalize_stopped();
            }
            if (rc != 0)
                fprintf(stderr, "heat.c: snapshot failed, continuing: %s\n", sv_last_error());
        }
    }
    sv_finalize();
    char hex[65];
    if (sv_digest_hex(grid, bytes, hex) != 0) return fail("sv_digest_hex");
    printf("checksum %s\n", hex);
    free(grid);
    free(next);
    return 0;
}
