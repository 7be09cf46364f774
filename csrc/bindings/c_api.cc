// The C API's table: each function queues a collective and reports its end through
// Work::when_done, so the caller needs no thread of its own to wait on it.
#include "bindings/c_api.h"

#include <collectives/c_api.h>

#include <exception>
#include <memory>
#include <stdexcept>
#include <string>

#include "communicator.h"

namespace collectives {
namespace {

// Reports `error` (null: success) to done.
void report(std::exception_ptr error, collectives_done_fn done, void* context) {
  if (!error) {
    done(context, COLLECTIVES_OK, nullptr);
    return;
  }
  try {
    std::rethrow_exception(error);
  } catch (const TimeoutError& e) {
    done(context, COLLECTIVES_TIMEOUT, e.what());
  } catch (const CollectiveError& e) {
    done(context, COLLECTIVES_ERROR, e.what());
  } catch (const std::invalid_argument& e) {
    done(context, COLLECTIVES_INVALID_ARGUMENT, e.what());
  } catch (const std::exception& e) {
    done(context, COLLECTIVES_ERROR, e.what());
  } catch (...) {
    done(context, COLLECTIVES_ERROR, "unknown error");
  }
}

// Queues `collective` (a call of the Communicator's, given the caller's Interruption or null,
// returning the Work), reporting a refusal at once. Blocking: the caller lends its thread,
// and is never interrupted (it has no signals to look at: its own timeout ends a wait).
template <typename Collective>
void queue(int blocking, collectives_done_fn done, void* context, Collective collective) {
  Interruption never([] { return false; });
  std::shared_ptr<Work> work;
  try {
    work = collective(blocking ? &never : nullptr);
  } catch (...) {
    report(std::current_exception(), done, context);
    return;
  }
  work->when_done([done, context](std::exception_ptr error) { report(error, done, context); });
}

Communicator& communicator(void* handle) { return *static_cast<Communicator*>(handle); }

void allreduce(void* comm, void* data, size_t count, int dtype, int op, int blocking, collectives_done_fn done,
               void* context) {
  queue(blocking, done, context, [&](Interruption* caller) {
    return communicator(comm).allreduce(data, count, checked_dtype(dtype), checked_op(op), caller);
  });
}

void allgather(void* comm, const void* input, void* output, size_t count, int dtype, int blocking,
               collectives_done_fn done, void* context) {
  queue(blocking, done, context, [&](Interruption* caller) {
    return communicator(comm).allgather(input, output, count, checked_dtype(dtype), caller);
  });
}

void broadcast(void* comm, void* data, size_t count, int dtype, int root, int blocking, collectives_done_fn done,
               void* context) {
  queue(blocking, done, context, [&](Interruption* caller) {
    return communicator(comm).broadcast(data, count, checked_dtype(dtype), root, caller);
  });
}

int size(void* comm) { return communicator(comm).size(); }

const collectives_c_api kTable = {COLLECTIVES_C_API_VERSION, allreduce, allgather, broadcast, size};

}  // namespace

void bind_c_api(pybind11::module_& m) {
  m.attr("C_API_ADDRESS") = reinterpret_cast<uintptr_t>(&kTable);
  m.attr("C_API_VERSION") = COLLECTIVES_C_API_VERSION;
}

}  // namespace collectives
