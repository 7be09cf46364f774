#pragma once

#include <Python.h>

#include <chrono>
#include <thread>

namespace collectives {

// Python's main thread, which finalizes the interpreter (set when the module is imported).
inline unsigned long& python_main_thread() {
  static unsigned long ident = 0;
  return ident;
}

// Whether the interpreter has begun to finalize (the process is exiting) and this thread is
// not the one finalizing it: CPython would not let it take the GIL.
inline bool shut_out_by_finalization() {
#if PY_VERSION_HEX >= 0x030D0000
  const bool finalizing = Py_IsFinalizing();
#else
  const bool finalizing = _Py_IsFinalizing();
#endif
  return finalizing && PyThread_get_thread_ident() != python_main_thread();
}

// A thread that comes back to Python while the interpreter finalizes is never to take the
// GIL: CPython before 3.14 ends such a thread with pthread_exit, and that unwinding, begun in a
// destructor that takes the GIL back (pybind11's gil_scoped_release), calls std::terminate. A
// daemon thread waiting on a collective when the process exits (the torch backend's completer,
// whose Work the exit's close() just finished) would abort the process ("terminate called
// without an active exception"). Such a thread stays here instead, until the process ends.
[[noreturn]] inline void park_for_good() {
  for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
}

// The GIL released for a call that may block, as pybind11's gil_scoped_release, but taken back
// only by a thread that finalization does not shut out (above). Usable as a py::call_guard.
// Finalization may still begin between that check and the taking: then CPython's pthread_exit
// unwinds from this destructor, which is why it may throw (noexcept(false)): the unwinding goes
// on through pybind11, which lets it pass, and ends the thread instead of the process.
class ReleasedGil {
 public:
  ReleasedGil() : state_(PyEval_SaveThread()) {}
  ~ReleasedGil() noexcept(false) {
    if (shut_out_by_finalization()) park_for_good();
    PyEval_RestoreThread(state_);
  }
  ReleasedGil(const ReleasedGil&) = delete;
  ReleasedGil& operator=(const ReleasedGil&) = delete;

 private:
  PyThreadState* state_;
};

}  // namespace collectives
