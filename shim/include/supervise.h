/* supervise shim: the C ABI (see shim/src/ffi.rs, which documents each function).
 *
 * Link: libsupervise_shim.a (with -lpthread -ldl -lm) or libsupervise_shim.so.
 * Functions return 0 (or the documented positive value) on success and a negative SV_E*
 * code on error; sv_last_error() then says what went wrong, for the calling thread. No call
 * aborts the program. One shim per process; every function may be called from any thread
 * (they serialise on one lock), but a program normally calls them from its main loop.
 */
#ifndef SUPERVISE_H
#define SUPERVISE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SV_OK 0
#define SV_EINVAL (-1)    /* NULL pointer, bad or unknown name, zero size */
#define SV_ESTATE (-2)    /* called before sv_init succeeded, or after sv_finalize */
#define SV_ESIZE (-3)     /* a region's size differs from the snapshot's (both named) */
#define SV_EIO (-4)       /* the store could not be read or written, or is damaged */
#define SV_EINTERNAL (-5) /* a bug in the shim, caught */

/* Reads the SUPERVISE_* environment; works without a supervisor (then it does nothing, or
 * snapshots locally with SUPERVISE_STORE). Call once, first. */
int sv_init(void);

/* Registers `bytes` bytes at `ptr` under `name` (letters, digits, '-', '_', '.'). The memory
 * must stay valid until sv_unprotect or sv_finalize. A name registered again is replaced. */
int sv_protect(const char *name, void *ptr, size_t bytes);

/* Forgets a region: later snapshots do not hold it. Unknown names are an error. */
int sv_unprotect(const char *name);

/* 1 when this run resumes from a snapshot, 0 when it starts fresh. */
int sv_is_restart(void);

/* Fills every protected region from that snapshot, verifying every chunk. */
int sv_restore(void);

/* 1 when a snapshot was requested (schedule, SIGUSR1, operator), else 0. One atomic load when
 * nothing is pending: call it at every safe point. */
int sv_checkpoint_requested(void);

/* Snapshots all protected regions now (copied during the call, written in the background).
 * `tag` may be NULL. If the supervisor asked the program to stop, the process exits (75) once
 * this snapshot is durable. */
int sv_checkpoint(const char *tag);

/* Checkpoints if one was requested; 1 if it took one, 0 if none was due. */
int sv_poll(const char *tag);

/* The message of the last error on this thread ("" if none); valid until the next call. */
const char *sv_last_error(void);

/* Waits for a snapshot still being written and closes the shim. */
void sv_finalize(void);

/* Writes the blake3 hash of `bytes` bytes at `ptr` as 64 hex digits and a NUL into `out`
 * (65 bytes): the hash the store uses. */
int sv_digest_hex(const void *ptr, size_t bytes, char *out);

#ifdef __cplusplus
}
#endif

#endif /* SUPERVISE_H */
