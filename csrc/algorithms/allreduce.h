// All-reduce algorithms as objects (ring, recursive doubling, reduction server, ...): each keeps
// its own state between calls, and the communicator picks one per call (algorithms/select.h).
//
// A call lives from the moment its collective is queued to the end of its run, so that an
// algorithm can put a call's data on the wire before the call's turn (the reduction server
// does). The communicator makes every call but run() under its lock, in the order the
// collectives were queued; run() comes on the communicator's thread, in that order too.
#pragma once

#include <cstddef>
#include <memory>

#include "algorithms/algorithm.h"
#include "transport/frame.h"

namespace collectives {

class AllreduceCall {
 public:
  virtual ~AllreduceCall() = default;
  // Whether the call has something to send ahead of its turn that it has not sent yet.
  virtual bool waits_to_start() const { return false; }
  // Sends it. The communicator offers this only while no earlier unfinished collective
  // touches the call's buffer, and at the call's turn. False: not yet (and the calls queued
  // behind this one wait too, since calls start in order).
  virtual bool start() { return true; }
  // In place, over ctx.group; ctx.tag is the tag the call was made with.
  virtual void run(const AlgorithmContext& ctx) = 0;
  // The run returned without an error.
  virtual void succeeded() {}
};

class AllreduceAlgorithm {
 public:
  virtual ~AllreduceAlgorithm() = default;
  virtual const char* name() const = 0;
  // Whether a call waits for nothing but the context's waits (AlgorithmContext::wait), so that
  // a caller's thread may run it (and notice an interruption while it waits).
  virtual bool waits_through_context() const { return true; }
  // One all-reduce of tag.count elements of tag.dtype at `data`.
  virtual std::unique_ptr<AllreduceCall> call(const CollectiveTag& tag, void* data) = 0;
};

// An algorithm whose calls hold nothing between being queued and running.
class DirectAllreduce : public AllreduceAlgorithm {
 public:
  // In place: count elements of ctx.tag.dtype at data, reduced with ctx.tag.op over ctx.group.
  virtual void run(const AlgorithmContext& ctx, void* data, size_t count) = 0;

  std::unique_ptr<AllreduceCall> call(const CollectiveTag&, void* data) override {
    class Direct : public AllreduceCall {
     public:
      Direct(DirectAllreduce& algorithm, void* data) : algorithm_(algorithm), data_(data) {}
      void run(const AlgorithmContext& ctx) override { algorithm_.run(ctx, data_, ctx.tag.count); }

     private:
      DirectAllreduce& algorithm_;
      void* data_;
    };
    return std::make_unique<Direct>(*this, data);
  }
};

}  // namespace collectives
