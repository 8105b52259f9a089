/* supervise shim: the C ABI. Generated from shim/capi/src/lib.rs by cbindgen; do not edit.
 *
 * Link: libsupervise.a (with -lpthread -ldl -lm) or libsupervise.so, or use
 * `pkg-config --cflags --libs supervise-shim` after scripts/install-shim.sh.
 * Functions return 0 (or the documented positive value) on success and a negative SV_E*
 * code on error; sv_last_error() then says what went wrong, for the calling thread. No call
 * aborts the program. One shim per process; every function may be called from any thread
 * (they serialise on one lock), but a program normally calls them from its main loop.
 */

#ifndef SUPERVISE_H
#define SUPERVISE_H

#include <stddef.h>
#include <stdio.h>

/*
 Success.
 */
#define SV_OK 0

/*
 A bad argument: NULL pointer, bad or unknown name, zero size.
 */
#define SV_EINVAL -1

/*
 Called before `sv_init` succeeded (or after `sv_finalize`).
 */
#define SV_ESTATE -2

/*
 A region's size differs from the snapshot's (the message names both).
 */
#define SV_ESIZE -3

/*
 Reading or writing the store failed, or a snapshot is damaged.
 */
#define SV_EIO -4

/*
 An internal error (a bug): the shim caught it and stays usable where it can.
 */
#define SV_EINTERNAL -5

/*
 Stored data is damaged. From `sv_restore`: the snapshot was set aside, and the program must
 start again (it then resumes from an older one).
 */
#define SV_EDAMAGED -6

/*
 From `sv_checkpoint` and `sv_poll`: a stop was requested (by the supervisor, by SIGTERM, or
 because the supervisor is gone) and the final snapshot was taken (`sv_last_error` says
 why if it failed). Clean up, call `sv_finalize`, and exit with `SV_EXIT_STOPPED`, e.g.
 `return sv_finalize_stopped();` from `main`. The shim never ends the process itself.
 */
#define SV_STOP 2

/*
 The exit code of a program that stopped on request after its final snapshot: it tells the
 supervisor the stop was clean and the job can be resumed.
 */
#define SV_EXIT_STOPPED 75

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/*
 Tells the shim, before `sv_init`, that this MPI program agrees on each epoch's iteration
 through its own communicator (`supervise_mpi.h`: `sv_mpi_poll`) instead of calling
 `sv_checkpoint_requested` once per iteration. Every rank must say the same. Returns 0, or
 `SV_ESTATE` after `sv_init`.
 Thread safety: any thread, before `sv_init`.
 */
int sv_set_agreement(int on);

/*
 An MPI rank that agrees on epochs itself: the epoch the supervisor offers (> 0), its
 negative for a final one (the program stops after it), `INT64_MIN` for a stop without an
 epoch (the supervisor is gone), or 0 when none is offered. One atomic load. `supervise_mpi.h` reduces it over the communicator (the largest wins) and
 passes the result to `sv_checkpoint_epoch` on every rank at the same iteration.
 Thread safety: any thread.
 */
int64_t sv_epoch_offered(void);

/*
 Takes this rank's part of epoch `epoch` (as `sv_epoch_offered` gives it: negative for a
 final one, `INT64_MIN` for a stop without one) now, with every protected region, as
 `sv_checkpoint` does. Returns 0, `SV_STOP` after the final one or for a stop (clean up and
 `return sv_finalize_stopped();`), or a negative code. 0 with `epoch` 0 (nothing offered),
 and for an epoch this rank took already or that ended.
 Thread safety: as `sv_checkpoint`.

 # Safety
 As [`sv_checkpoint`].
 */
int sv_checkpoint_epoch(int64_t epoch, const char *tag);

/*
 Tells the shim this process's rank and the job's size, for an MPI program under a launcher
 whose variables the shim does not read (Open MPI, MPICH/PMI, MVAPICH and Slurm are read).
 Call it before `sv_init` (for example with the numbers `MPI_Comm_rank` and
 `MPI_Comm_size` give). Returns 0, or `SV_EINVAL` when `rank` is not below `size`, or
 `SV_ESTATE` after `sv_init`.
 Thread safety: any thread, before `sv_init`.
 */
int sv_set_rank(int rank, int size);

/*
 Starts the shim: reads the `SUPERVISE_*` environment (works without a supervisor: then it
 does nothing, or snapshots locally with `SUPERVISE_STORE`) and opens the snapshot to
 restore, if any. Call once, first. Returns 0, or a negative code.

 Thread safety: call once, before any other `sv_*` call, from one thread.
 */
int sv_init(void);

/*
 Registers `bytes` bytes at `ptr` under `name` (letters, digits, `-`, `_`, `.`): every
 later snapshot holds them, and `sv_restore` fills them. The memory must stay valid until
 `sv_unprotect` or `sv_finalize`. Registering a name again replaces the earlier region.
 Thread safety: any thread; serialised with the other calls.

 # Safety
 `name` is NULL or a NUL-terminated string; `ptr` is NULL or `bytes` bytes of memory that
 stay valid, readable and writable while protected.
 */
int sv_protect(const char *name, void *ptr, size_t bytes);

/*
 Forgets the region `name`: later snapshots do not hold it. Unknown names are an error.
 For a region from `sv_alloc`, this also frees its memory.
 Thread safety: any thread; no other thread may use the memory of a freed `sv_alloc` region.

 # Safety
 `name` is NULL or a NUL-terminated string.
 */
int sv_unprotect(const char *name);

/*
 Allocates `bytes` bytes of memory owned by the shim under `name` and returns it (NULL on
 error, see `sv_last_error`). When this run resumes, the memory already holds the
 snapshot's bytes (zeros if the snapshot has no such region; a size mismatch is an error).
 Snapshots capture it without a whole copy where the kernel tracks writes: only the 64 KiB
 chunks written since the last snapshot are copied. Page-aligned; valid until
 `sv_unprotect(name)` or `sv_finalize`.

 Thread safety: any thread; serialised with the other calls.

 # Safety
 `name` is NULL or a NUL-terminated string.
 */
void *sv_alloc(const char *name, size_t bytes);

/*
 Opens the append-only output file `path` (relative to the working directory) as a C
 stream, or returns NULL (see `sv_last_error`). Write to it with `fprintf`, `fputs`,
 `fwrite`...; at every snapshot the shim calls `fflush` on it and records the file's length
 (everything written before the safe point). A run resumed from a snapshot cuts the file
 back to the length it recorded, so the file ends byte for byte as an uninterrupted run's;
 a fresh start begins with an empty file; without a supervisor and without
 `SUPERVISE_STORE` it is a plain file opened for appending. A file shorter than a snapshot
 recorded is an error naming it and both lengths.

 The shim owns the stream: never `fclose` it (`sv_finalize` flushes and closes it), and
 write to the file only through it.

 Thread safety: any thread; the stream may be written from one thread at a time, which must
 not write during `sv_checkpoint`/`sv_poll` (call them from the writing thread).

 # Safety
 `path` is NULL or a NUL-terminated string.
 */
FILE *sv_output(const char *path);

/*
 1 when this run resumes from a snapshot, 0 when it starts fresh, negative on error.

 Thread safety: any thread.
 */
int sv_is_restart(void);

/*
 Fills every protected region from the snapshot this run resumes from, verifying every
 chunk. A region the snapshot does not hold, or whose size differs, is an error naming it.
 (Regions from `sv_alloc` are filled when allocated.)

 Thread safety: any thread, while no thread writes the protected memory.
 */
int sv_restore(void);

/*
 1 when a snapshot was requested (schedule, SIGUSR1, operator), else 0. One atomic load
 when nothing is pending. Call it at safe points.

 Thread safety: any thread; takes no lock.
 */
int sv_checkpoint_requested(void);

/*
 Snapshots every protected region now: they are copied during the call, then written in the
 background. `tag` (may be NULL) labels the snapshot (e.g. "step 1200"). Returns 0, or
 `SV_STOP` when a stop was requested: this was the final snapshot (durable, or failed:
 `sv_last_error` says why), and the program should clean up and exit with
 `SV_EXIT_STOPPED` (`return sv_finalize_stopped();`).
 Thread safety: any thread, while no thread writes `sv_protect` memory (it is copied during the call); `sv_alloc` memory may be written by other threads (tracked).

 # Safety
 `tag` is NULL or a NUL-terminated string; the protected memory is still valid.
 */
int sv_checkpoint(const char *tag);

/*
 At a safe point: takes a snapshot if one was requested. Returns 1 if it took one, 0 if
 none was due, `SV_STOP` if it took the final one before a requested stop (see
 `sv_checkpoint`), negative on error.
 Thread safety: as `sv_checkpoint`.

 # Safety
 As [`sv_checkpoint`].
 */
int sv_poll(const char *tag);

/*
 1 once a stop was requested (by the supervisor, by SIGTERM, or because the supervisor is
 gone): the next `sv_checkpoint` or `sv_poll` takes the final snapshot and returns
 `SV_STOP`. 0 otherwise, negative on error.

 Thread safety: any thread.
 */
int sv_should_stop(void);

/*
 `sv_finalize`, then returns `SV_EXIT_STOPPED`, the exit code of a clean stop: after
 `SV_STOP` and the program's own clean-up, `return sv_finalize_stopped();` from `main`.

 Thread safety: as `sv_finalize`.
 */
int sv_finalize_stopped(void);

/*
 The message of the last error on this thread ("" if none). Valid until the next `sv_*`
 call on this thread.

 Thread safety: any thread; each thread sees its own last error.
 */
const char *sv_last_error(void);

/*
 Waits for a snapshot still being written and closes the shim. Call at the end.

 Thread safety: once, at the end, when no other thread calls the shim.
 */
void sv_finalize(void);

/*
 Writes the blake3 hash of `bytes` bytes at `ptr` as 64 hex digits and a NUL into `out`
 (65 bytes): the hash the store uses, for programs that print a checksum of their state.
 Thread safety: any thread (needs no shim).

 # Safety
 `ptr` is NULL or `bytes` readable bytes; `out` is NULL or 65 writable bytes.
 */
int sv_digest_hex(const void *ptr, size_t bytes, char *out);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* SUPERVISE_H */
