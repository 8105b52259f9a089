/* supervise_mpi.h: header-only helper for MPI programs that prefer to agree on the iteration
 * of each snapshot through their own communicator, instead of calling
 * sv_checkpoint_requested() exactly once per iteration on every rank (the shim's default,
 * where the supervisor names the iteration).
 *
 *   #include <mpi.h>
 *   #include "supervise.h"
 *   #include "supervise_mpi.h"
 *
 *   MPI_Init(&argc, &argv);
 *   sv_set_agreement(1);                 // before sv_init, on every rank
 *   sv_init();
 *   ...
 *   for (; step < steps; step++) {
 *       compute();
 *       if (step % 8 == 0) {             // every few steps, at the same step on every rank
 *           int rc = sv_mpi_poll(MPI_COMM_WORLD, "step");
 *           if (rc == SV_STOP) { MPI_Finalize(); return sv_finalize_stopped(); }
 *       }
 *   }
 *
 * sv_mpi_poll is collective: every rank of `comm` must call it at the same iteration. It
 * reduces the epoch each rank was offered (MPI_MAX: a rank whose offer has not arrived yet
 * takes part all the same) and, when one was, every rank takes its part of that epoch now
 * (sv_checkpoint_epoch). The cost when nothing is offered is one MPI_Allreduce of two
 * integers. Returns 0 (nothing offered), 1 (a part taken), SV_STOP (the final part taken:
 * stop), or a negative code from sv_checkpoint_epoch.
 */
#ifndef SUPERVISE_MPI_H
#define SUPERVISE_MPI_H

#include <mpi.h>
#include <stdint.h>

#include "supervise.h"

static inline int sv_mpi_poll(MPI_Comm comm, const char *tag) {
    int64_t offered = sv_epoch_offered();
    /* [0]: the epoch, [1]: 1 for a final one (or a stop without an epoch: INT64_MIN). The
     * largest of each wins. */
    long long mine[2] = {offered == INT64_MIN ? 0 : (offered < 0 ? -offered : offered),
                         offered < 0 ? 1 : 0};
    long long agreed[2] = {0, 0};
    if (MPI_Allreduce(mine, agreed, 2, MPI_LONG_LONG, MPI_MAX, comm) != MPI_SUCCESS)
        return SV_EINTERNAL;
    if (agreed[0] == 0)
        return agreed[1] ? sv_checkpoint_epoch(INT64_MIN, tag) : 0;
    int rc = sv_checkpoint_epoch(agreed[1] ? -(int64_t)agreed[0] : (int64_t)agreed[0], tag);
    return rc == 0 ? 1 : rc;
}

#endif /* SUPERVISE_MPI_H */
