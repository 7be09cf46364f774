/*
 * collectives' C API: a table of functions that the loaded core (collectives._core) fills, for
 * compiled extensions that queue collectives on a Python-made communicator without linking the
 * core (collectives.tf's TensorFlow ops). Nothing here is linked: Python hands the extension the
 * table's address (collectives.c_api.table_address()) and a communicator's
 * (Communicator.c_handle), so the extension stays free of the core's dependencies (TensorFlow
 * exports BoringSSL under OpenSSL's names: see collectives/_core_loading.py).
 *
 * Ships inside the package (collectives.c_api.include_dir()); C and C++.
 */
#ifndef COLLECTIVES_C_API_H
#define COLLECTIVES_C_API_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Raised when a field is added or changed: an extension checks it equals the one it built with. */
#define COLLECTIVES_C_API_VERSION 1

/* How a collective ended (done's status). */
enum collectives_status {
  COLLECTIVES_OK = 0,
  COLLECTIVES_ERROR = 1,         /* collectives.CollectiveError: a peer failed, the communicator was closed ... */
  COLLECTIVES_TIMEOUT = 2,       /* collectives.TimeoutError */
  COLLECTIVES_INVALID_ARGUMENT = 3 /* refused before anything was queued (a bad dtype, op or root) */
};

/* Data types and reduce ops: the codes of collectives._core.DTYPES and OPS. */
enum collectives_dtype {
  COLLECTIVES_FLOAT16 = 0, COLLECTIVES_BFLOAT16 = 1, COLLECTIVES_FLOAT32 = 2, COLLECTIVES_FLOAT64 = 3,
  COLLECTIVES_INT8 = 4, COLLECTIVES_UINT8 = 5, COLLECTIVES_INT32 = 6, COLLECTIVES_INT64 = 7
};
enum collectives_op { COLLECTIVES_SUM = 0, COLLECTIVES_AVG = 1, COLLECTIVES_MIN = 2, COLLECTIVES_MAX = 3, COLLECTIVES_PROD = 4 };

/*
 * Called exactly once per collective: with COLLECTIVES_OK and a null message when it finished,
 * otherwise with the failure's status and message (valid during the call only). It runs on the
 * communicator's thread; on the caller's, before the queuing function returns, for a collective
 * refused at once or run there (blocking, below); or on the thread that closes the communicator,
 * for the collectives still queued then. So it must return quickly, throw nothing, and never
 * wait on another collective.
 */
typedef void (*collectives_done_fn)(void* context, int status, const char* message);

/*
 * Each function queues one collective on `communicator` behind those queued before it (every
 * rank queues the same collectives in the same order); the buffers must stay valid, and unread
 * and unwritten by others, until `done` is called. blocking == 0: returns at once, and `done`
 * runs on the communicator's thread. blocking != 0: the caller lends its thread (it is going to
 * wait for `done` anyway): where nothing else is queued, the collective runs on it and `done`
 * is called before the function returns (no thread hand-off: the fastest for one collective at
 * a time), otherwise as without it.
 */
typedef struct collectives_c_api {
  uint32_t version; /* COLLECTIVES_C_API_VERSION */
  /* In place: count elements at data reduced over every rank. */
  void (*allreduce)(void* communicator, void* data, size_t count, int dtype, int op, int blocking,
                    collectives_done_fn done, void* context);
  /* output: size() * count elements, block r rank r's input. */
  void (*allgather)(void* communicator, const void* input, void* output, size_t count, int dtype, int blocking,
                    collectives_done_fn done, void* context);
  /* In place: root's data on every rank. */
  void (*broadcast)(void* communicator, void* data, size_t count, int dtype, int root, int blocking,
                    collectives_done_fn done, void* context);
  int (*size)(void* communicator);
} collectives_c_api;

#ifdef __cplusplus
}
#endif

#endif /* COLLECTIVES_C_API_H */
