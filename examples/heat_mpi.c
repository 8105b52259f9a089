/* examples/heat.c split over MPI ranks: the same 2-D heat equation on an N x N grid of doubles
 * (alpha 0.2, top row 100.0, fixed boundary rows and columns), its N-2 interior rows divided
 * in row blocks over the ranks (uneven splits too), one halo row exchanged up and down each
 * step. Each rank registers only its own rows and its step with the supervise shim. At the
 * end rank 0 gathers the grid and prints `checksum <hex>` (blake3 of the whole grid's bytes),
 * equal to heat.c's for the same --n and --steps, whatever the number of ranks.
 *
 *   mpicc -O2 examples/heat_mpi.c -Ishim/capi/include target/release/libsupervise.a -lpthread -ldl -lm -o heat-mpi
 *   mpirun --allow-run-as-root --oversubscribe -n 4 ./heat-mpi --n 64 --steps 200
 *
 * Options: --n N, --steps S, --sleep-ms K (sleep K ms each step, to slow it down for tests),
 * --agree K. Every rank calls sv_checkpoint_requested() exactly once per step, at the same
 * point (right after step++): the supervisor coordinates the ranks' snapshots by counting
 * those calls. With --agree K the ranks agree among themselves instead, every K steps, with
 * supervise_mpi.h's sv_mpi_poll (an MPI_Allreduce of the epoch the supervisor offers).
 * With --table-kib K every rank also holds the same K KiB table (replicated data, as in
 * codes where every rank keeps the global coefficients), rewritten alike on every rank each
 * 20 steps: supervise stores its chunks once per epoch, not once per rank. A resumed rank
 * checks its restored table against the one it would have computed.
 */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "supervise.h"
#include "supervise_mpi.h"


static int rank = 0;

static int fail(const char *what) {
    fprintf(stderr, "heat_mpi: rank %d: %s: %s\n", rank, what, sv_last_error());
    MPI_Abort(MPI_COMM_WORLD, 1); /* the other ranks would wait for this one forever */
    return 1;
}

/* splitmix64: the table's words. */
static uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* The replicated table as of `version` (step / 20), the same on every rank. */
static void fill_table(uint64_t *table, size_t words, uint64_t version) {
    for (size_t i = 0; i < words; i++) table[i] = mix(version * 0x100000001b3ULL + i);
}

static void sleep_ms(unsigned long ms) {
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

int main(int argc, char **argv) {
    size_t n = 2048;
    uint64_t steps = 5400, step = 0;
    unsigned long sleep = 0;
    uint64_t agree = 0; /* agree on snapshots every this many steps (0: the shim counts) */
    size_t table_words = 0; /* the replicated table (--table-kib) */
    const double alpha = 0.2;
    int size = 1;

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);

    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && strcmp(argv[i], "--n") == 0) {
            n = strtoull(argv[++i], NULL, 10);
        } else if (i + 1 < argc && strcmp(argv[i], "--steps") == 0) {
            steps = strtoull(argv[++i], NULL, 10);
        } else if (i + 1 < argc && strcmp(argv[i], "--sleep-ms") == 0) {
            sleep = strtoul(argv[++i], NULL, 10);
        } else if (i + 1 < argc && strcmp(argv[i], "--agree") == 0) {
            agree = strtoull(argv[++i], NULL, 10);
        } else if (i + 1 < argc && strcmp(argv[i], "--table-kib") == 0) {
            table_words = strtoull(argv[++i], NULL, 10) * 1024 / sizeof(uint64_t);
        } else {
            if (rank == 0)
                fprintf(stderr, "usage: heat-mpi [--n N] [--steps S] [--sleep-ms K] [--agree K] [--table-kib K]\n");
            MPI_Finalize();
            return 2;
        }
    }
    if (n < 3 || n - 2 < (size_t)size) {
        if (rank == 0) fprintf(stderr, "--n must be at least 3 and leave a row per rank (n - 2 >= %d)\n", size);
        MPI_Finalize();
        return 2;
    }

    /* This rank's block: interior rows [first, first + rows) of the global grid; the first
     * `extra` ranks take one row more when N-2 does not divide evenly. */
    size_t interior = n - 2, base = interior / (size_t)size, extra = interior % (size_t)size;
    size_t r = (size_t)rank;
    size_t rows = base + (r < extra ? 1 : 0);
    size_t first = 1 + r * base + (r < extra ? r : extra);
    int up = rank > 0 ? rank - 1 : MPI_PROC_NULL;
    int down = rank + 1 < size ? rank + 1 : MPI_PROC_NULL;

    /* Local rows 1..rows are this rank's; rows 0 and rows+1 are halos (for the first and
     * last rank, the fixed boundary rows: top 100.0, bottom 0.0, never received). */
    size_t local = (rows + 2) * n;
    size_t own_bytes = rows * n * sizeof(double);
    double *grid = calloc(local, sizeof(double));
    double *next = calloc(local, sizeof(double));
    uint64_t *table = calloc(table_words + 1, sizeof(uint64_t));
    uint64_t *expected = calloc(table_words + 1, sizeof(uint64_t));
    if (!grid || !next || !table || !expected) {
        fprintf(stderr, "heat_mpi: rank %d: out of memory\n", rank);
        MPI_Abort(MPI_COMM_WORLD, 1);
        return 1;
    }
    if (first == 1)
        for (size_t j = 0; j < n; j++) grid[j] = 100.0;

    /* 1. Start the shim, register this rank's rows and the step, restore them on a resume. */
    if (agree > 0 && sv_set_agreement(1) != 0) return fail("sv_set_agreement");
    if (sv_init() != 0) return fail("sv_init");
    if (sv_protect("grid", grid + n, own_bytes) != 0) return fail("sv_protect grid");
    if (sv_protect("step", &step, sizeof step) != 0) return fail("sv_protect step");
    fill_table(table, table_words, 0);
    if (table_words > 0 && sv_protect("table", table, table_words * sizeof(uint64_t)) != 0)
        return fail("sv_protect table");
    if (sv_is_restart() == 1) {
        if (sv_restore() != 0) return fail("sv_restore");
        fprintf(stderr, "heat_mpi: rank %d resumed at step %llu\n", rank, (unsigned long long)step);
        fill_table(expected, table_words, step / 20);
        if (memcmp(table, expected, table_words * sizeof(uint64_t)) != 0) {
            fprintf(stderr, "heat_mpi: rank %d: the restored table is not step %llu's\n", rank,
                    (unsigned long long)step);
            MPI_Abort(MPI_COMM_WORLD, 1);
            return 1;
        }
    }
    /* Every rank must be at the same step, or the halo exchanges never match up. */
    unsigned long long mine = step, lo = 0, hi = 0;
    MPI_Allreduce(&mine, &lo, 1, MPI_UNSIGNED_LONG_LONG, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(&mine, &hi, 1, MPI_UNSIGNED_LONG_LONG, MPI_MAX, MPI_COMM_WORLD);
    if (lo != hi) {
        if (rank == 0) fprintf(stderr, "heat_mpi: ranks resumed at different steps (%llu..%llu)\n", lo, hi);
        MPI_Abort(MPI_COMM_WORLD, 1);
        return 1;
    }
    memcpy(next, grid, local * sizeof(double));

    while (step < steps) {
        /* Halos: my first row goes up while the row below arrives, my last row goes down
         * while the row above arrives (MPI_PROC_NULL at the edges leaves the boundary). */
        MPI_Sendrecv(grid + n, (int)n, MPI_DOUBLE, up, 0, grid + (rows + 1) * n, (int)n, MPI_DOUBLE,
                     down, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        MPI_Sendrecv(grid + rows * n, (int)n, MPI_DOUBLE, down, 1, grid, (int)n, MPI_DOUBLE, up, 1,
                     MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        for (size_t i = 1; i <= rows; i++) {
            const double *u = grid + (i - 1) * n, *mid = grid + i * n, *d = grid + (i + 1) * n;
            double *row = next + i * n;
            row[0] = mid[0];
            row[n - 1] = mid[n - 1];
            for (size_t j = 1; j + 1 < n; j++)
                row[j] = mid[j] + alpha * (u[j] + d[j] + mid[j - 1] + mid[j + 1] - 4.0 * mid[j]);
        }
        double *t = grid;
        grid = next;
        next = t;
        step++;
        if (step % 20 == 0) fill_table(table, table_words, step / 20);
        /* 2. The safe point, once per step on every rank. The rows moved (buffers swap each
         * step): register where they are now, then take the snapshot. With --agree, the
         * ranks agree every `agree` steps through MPI instead. */
        int rc = 0, took = 0;
        char tag[32];
        snprintf(tag, sizeof tag, "step %llu", (unsigned long long)step);
        if (agree > 0) {
            if (step % agree == 0) {
                rc = sv_protect("grid", grid + n, own_bytes);
                if (rc == 0) rc = sv_mpi_poll(MPI_COMM_WORLD, tag);
                if (rc == 1) rc = 0;
                took = 1;
            }
        } else if (sv_checkpoint_requested() == 1) {
            rc = sv_protect("grid", grid + n, own_bytes);
            if (rc == 0) rc = sv_checkpoint(tag);
            took = 1;
        }
        if (took) {
            if (rc == SV_STOP) { /* asked to stop: the final snapshot is taken */
                free(grid);
                free(next);
                free(table);
                free(expected);
                MPI_Finalize();
                return sv_finalize_stopped();
            }
            if (rc != 0)
                fprintf(stderr, "heat_mpi: rank %d: snapshot failed, continuing: %s\n", rank,
                        sv_last_error());
        }
        if (sleep) sleep_ms(sleep);
    }
    sv_finalize();

    /* 3. Rank 0 gathers the interior rows between the fixed boundary rows, and hashes it all. */
    double *full = NULL;
    int *counts = NULL, *displs = NULL;
    if (rank == 0) {
        full = calloc(n * n, sizeof(double));
        counts = malloc((size_t)size * sizeof(int));
        displs = malloc((size_t)size * sizeof(int));
        if (!full || !counts || !displs) {
            fprintf(stderr, "heat_mpi: out of memory\n");
            MPI_Abort(MPI_COMM_WORLD, 1);
            return 1;
        }
        for (size_t j = 0; j < n; j++) full[j] = 100.0;
        for (size_t q = 0; q < (size_t)size; q++) {
            size_t qrows = base + (q < extra ? 1 : 0);
            size_t qfirst = 1 + q * base + (q < extra ? q : extra);
            counts[q] = (int)(qrows * n);
            displs[q] = (int)(qfirst * n);
        }
    }
    MPI_Gatherv(grid + n, (int)(rows * n), MPI_DOUBLE, full, counts, displs, MPI_DOUBLE, 0,
                MPI_COMM_WORLD);
    int status = 0;
    if (rank == 0) {
        char hex[65];
        if (sv_digest_hex(full, n * n * sizeof(double), hex) != 0) {
            fprintf(stderr, "heat_mpi: sv_digest_hex: %s\n", sv_last_error());
            status = 1;
        } else {
            printf("checksum %s\n", hex);
        }
        free(full);
        free(counts);
        free(displs);
    }
    free(grid);
    free(next);
    free(table);
    free(expected);
    MPI_Finalize();
    return status;
}
