// collectives.tf's TensorFlow ops, compiled against the installed TensorFlow at first use
// (collectives/tf/_native.py). They link nothing of collectives: the collectives are queued
// through the C API table (collectives/c_api.h) whose address Python hands to
// collectives_tf_bind once the library is loaded.
//
// A collective is two ops, as Horovod's are one asynchronous op whose work a background thread
// does: CollectivesStart queues it on the communicator's thread and returns a handle at once;
// CollectivesWait (asynchronous: it holds no thread while it waits) outputs the result once
// the communicator reports it done. Both are stateful, so tf.function keeps them in program
// order: every rank queues its collectives in the same order, and the starts of a step's
// gradient buckets run as soon as their gradients exist while the waits come after them, so the
// all-reduces overlap the rest of the backward pass.
//
// The result lives in a buffer of the op's: its input's own when the op holds the only
// reference (a concatenated bucket), so the collective runs in place; a copy otherwise. It
// has the input's shape (an all-gather's: the ranks' dimension first).
#include <collectives/c_api.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "tensorflow/core/framework/cancellation.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using namespace tensorflow;  // NOLINT: TensorFlow's op macros expect its names

const collectives_c_api* api = nullptr;  // set once by collectives_tf_bind, before any op runs

// A collective between its start and its wait.
struct InFlight {
  int64_t count = 0;  // elements of the input (per rank)
  Tensor input;   // an all-gather's, read after the start op has returned
  Tensor result;  // the buffer the collective writes
  std::mutex mutex;
  bool finished = false;
  Status status;
  std::function<void()> waiter;  // the wait op's completion, if it came first
};

// Start ops hand their collectives to wait ops by handle.
class Registry {
 public:
  int64_t add(std::shared_ptr<InFlight> entry) {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t handle = next_++;
    entries_.emplace(handle, std::move(entry));
    return handle;
  }
  std::shared_ptr<InFlight> take(int64_t handle) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.find(handle);
    if (it == entries_.end()) return nullptr;
    std::shared_ptr<InFlight> entry = std::move(it->second);
    entries_.erase(it);
    return entry;
  }
  size_t size() {
    std::lock_guard<std::mutex> lock(mutex_);
    return entries_.size();
  }

 private:
  std::mutex mutex_;
  int64_t next_ = 0;
  std::unordered_map<int64_t, std::shared_ptr<InFlight>> entries_;
};

Registry& registry() {
  static Registry* instance = new Registry();  // never destroyed: callbacks may outlive exit
  return *instance;
}

// In a graph or tf.function the cancellation manager is the step's: cancelled when the step
// fails, and on its destruction at the step's end. Then `handle` leaves the registry if no wait
// op took it (a failed step's), so its buffers are freed once the collective ends. (Eagerly each
// op runs with a manager of its own, gone when the op returns: there the start op is told not to
// (forget_at_step_end), and an eager caller forgets a start it will not wait for through
// collectives_tf_forget.)
void forget_at_step_end(OpKernelContext* context, int64_t handle) {
  CancellationManager* manager = context->cancellation_manager();
  if (manager == nullptr) return;
  auto forget = [handle] { registry().take(handle); };  // a handle is never reused: no-op once taken
  if (!manager->RegisterCallback(manager->get_cancellation_token(), forget)) forget();  // already cancelled
}

// The C API's done: the collective's status, then the wait op's completion if it waits already.
void finished(void* context, int status, const char* message) {
  std::unique_ptr<std::shared_ptr<InFlight>> held(static_cast<std::shared_ptr<InFlight>*>(context));
  InFlight& entry = **held;
  std::function<void()> waiter;
  {
    std::lock_guard<std::mutex> lock(entry.mutex);
    // The Python exception's name first, as the numpy_function path reports it.
    if (status == COLLECTIVES_INVALID_ARGUMENT) {
      entry.status = errors::InvalidArgument(message);
    } else if (status == COLLECTIVES_TIMEOUT) {
      entry.status = errors::Unknown("collectives.errors.TimeoutError: ", message);
    } else if (status != COLLECTIVES_OK) {
      entry.status = errors::Unknown("collectives.errors.CollectiveError: ", message);
    }
    entry.finished = true;
    waiter.swap(entry.waiter);
  }
  if (waiter) waiter();
}

int dtype_code(DataType dtype) {
  switch (dtype) {
    case DT_HALF: return COLLECTIVES_FLOAT16;
    case DT_BFLOAT16: return COLLECTIVES_BFLOAT16;
    case DT_FLOAT: return COLLECTIVES_FLOAT32;
    case DT_DOUBLE: return COLLECTIVES_FLOAT64;
    case DT_INT8: return COLLECTIVES_INT8;
    case DT_UINT8: return COLLECTIVES_UINT8;
    case DT_INT32: return COLLECTIVES_INT32;
    case DT_INT64: return COLLECTIVES_INT64;
    default: return -1;  // refused by the op's type constraint first
  }
}

// What the start and run ops share: the collective's attributes, its buffers and its queuing.
class Collective {
 public:
  explicit Collective(OpKernelConstruction* context) {
    int64_t communicator;
    OP_REQUIRES_OK(context, context->GetAttr("communicator", &communicator));
    communicator_ = reinterpret_cast<void*>(static_cast<uintptr_t>(communicator));
    OP_REQUIRES_OK(context, context->GetAttr("kind", &kind_));
    OP_REQUIRES_OK(context, context->GetAttr("reduce_op", &reduce_op_));
    OP_REQUIRES_OK(context, context->GetAttr("root", &root_));
  }

  // The collective of input 0, its result's buffer made (in place where the input may be).
  Status prepare(OpKernelContext* context, InFlight& entry) const {
    if (api == nullptr) {
      return errors::FailedPrecondition("collectives' C API was not bound: load the ops through collectives.tf");
    }
    const Tensor& input = context->input(0);
    if (kind_ == "allgather") {
      entry.input = input;
      TensorShape stacked = input.shape();
      stacked.InsertDim(0, api->size(communicator_));
      return context->allocate_temp(input.dtype(), stacked, &entry.result);
    }
    TF_RETURN_IF_ERROR(context->forward_input_or_allocate_temp({0}, input.dtype(), input.shape(),
                                                               AllocatorAttributes(), &entry.result));
    if (entry.result.data() != input.data()) std::memcpy(entry.result.data(), input.data(), input.TotalBytes());
    return absl::OkStatus();
  }

  // Hands the collective to the communicator; finished() reports its end to `entry`.
  void queue(std::shared_ptr<InFlight> entry, int blocking) const {
    const int64_t count = entry->count;
    const int dtype = dtype_code(entry->result.dtype());
    void* data = entry->result.data();
    const void* input = entry->input.data();
    auto* context_of_done = new std::shared_ptr<InFlight>(std::move(entry));  // freed by finished()
    if (kind_ == "allreduce") {
      api->allreduce(communicator_, data, count, dtype, reduce_op_, blocking, finished, context_of_done);
    } else if (kind_ == "broadcast") {
      api->broadcast(communicator_, data, count, dtype, root_, blocking, finished, context_of_done);
    } else {
      api->allgather(communicator_, input, data, count, dtype, blocking, finished, context_of_done);
    }
  }

 private:
  void* communicator_;
  std::string kind_;
  int reduce_op_;
  int root_;
};

// Outputs the collective's result, or fails with its status; then done().
void complete(OpKernelContext* context, const InFlight& entry, const AsyncOpKernel::DoneCallback& done) {
  if (entry.status.ok()) {
    context->set_output(0, entry.result);
  } else {
    context->SetStatus(entry.status);
  }
  done();
}

// Queues the collective and returns its handle at once (for the gradient buckets).
class CollectivesStartOp : public OpKernel {
 public:
  explicit CollectivesStartOp(OpKernelConstruction* context) : OpKernel(context), collective_(context) {
    OP_REQUIRES_OK(context, context->GetAttr("forget_at_step_end", &forget_at_step_end_));
  }

  void Compute(OpKernelContext* context) override {
    auto entry = std::make_shared<InFlight>();
    entry->count = context->input(0).NumElements();
    OP_REQUIRES_OK(context, collective_.prepare(context, *entry));
    Tensor* handle = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({}), &handle));
    const int64_t id = registry().add(entry);
    handle->scalar<int64_t>()() = id;
    if (forget_at_step_end_) forget_at_step_end(context, id);
    collective_.queue(std::move(entry), /*blocking=*/0);
  }

 private:
  Collective collective_;
  bool forget_at_step_end_;
};

// Outputs the result of the collective that a start op's handle stands for, once done.
class CollectivesWaitOp : public AsyncOpKernel {
 public:
  using AsyncOpKernel::AsyncOpKernel;

  void ComputeAsync(OpKernelContext* context, DoneCallback done) override {
    const int64_t handle = context->input(0).scalar<int64_t>()();
    std::shared_ptr<InFlight> entry = registry().take(handle);
    OP_REQUIRES_ASYNC(context, entry != nullptr,
                      errors::InvalidArgument("no collective in flight has handle ", handle), done);
    {
      std::lock_guard<std::mutex> lock(entry->mutex);
      if (!entry->finished) {
        entry->waiter = [context, done, entry] { complete(context, *entry, done); };
        return;
      }
    }
    complete(context, *entry, done);
  }
};

// One collective, start to end (ctf.allreduce and its kind): lends the communicator its thread
// where nothing else is queued, so a lone collective runs without a thread hand-off; else it
// completes from the communicator's thread, holding none.
class CollectivesRunOp : public AsyncOpKernel {
 public:
  explicit CollectivesRunOp(OpKernelConstruction* context) : AsyncOpKernel(context), collective_(context) {}

  void ComputeAsync(OpKernelContext* context, DoneCallback done) override {
    auto entry = std::make_shared<InFlight>();
    entry->count = context->input(0).NumElements();
    OP_REQUIRES_OK_ASYNC(context, collective_.prepare(context, *entry), done);
    InFlight* raw = entry.get();  // the waiter is the entry's own: no cycle once it has run
    entry->waiter = [context, done, raw] { complete(context, *raw, done); };
    collective_.queue(std::move(entry), /*blocking=*/1);
  }

 private:
  Collective collective_;
};

// The ops' attributes: the dtypes the core reduces, and a collective's (start, run).
constexpr char kTypes[] = "T: {half, bfloat16, float, double, int8, uint8, int32, int64}";
constexpr char kKind[] = "kind: {'allreduce', 'allgather', 'broadcast'}";
constexpr char kCommunicator[] = "communicator: int";  // Communicator.c_handle
constexpr char kReduceOp[] = "reduce_op: int = 0";     // a collectives_op
constexpr char kRoot[] = "root: int = 0";

// A collective's result: the input's shape, an all-gather's with the ranks' dimension first
// (its size known when the op runs; Python sets it in the static shape).
absl::Status result_shape(shape_inference::InferenceContext* c) {
  std::string kind;
  TF_RETURN_IF_ERROR(c->GetAttr("kind", &kind));
  if (kind != "allgather") return shape_inference::UnchangedShape(c);
  shape_inference::ShapeHandle stacked;
  TF_RETURN_IF_ERROR(c->Concatenate(c->Vector(c->UnknownDim()), c->input(0), &stacked));
  c->set_output(0, stacked);
  return absl::OkStatus();
}

REGISTER_OP("CollectivesStart")
    .Input("tensor: T").Output("handle: int64")
    .Attr(kTypes).Attr(kKind).Attr(kCommunicator).Attr(kReduceOp).Attr(kRoot)
    .Attr("forget_at_step_end: bool = false")  // in a graph: see forget_at_step_end()
    .SetIsStateful().SetShapeFn(shape_inference::ScalarShape);
REGISTER_OP("CollectivesWait")
    .Input("handle: int64").Output("output: T")
    .Attr(kTypes)
    .SetIsStateful().SetShapeFn(shape_inference::UnknownShape);
REGISTER_OP("CollectivesRun")
    .Input("tensor: T").Output("output: T")
    .Attr(kTypes).Attr(kKind).Attr(kCommunicator).Attr(kReduceOp).Attr(kRoot)
    .SetIsStateful().SetShapeFn(result_shape);

REGISTER_KERNEL_BUILDER(Name("CollectivesRun").Device(DEVICE_CPU), CollectivesRunOp);
REGISTER_KERNEL_BUILDER(Name("CollectivesStart").Device(DEVICE_CPU), CollectivesStartOp);
REGISTER_KERNEL_BUILDER(Name("CollectivesWait").Device(DEVICE_CPU), CollectivesWaitOp);

}  // namespace

// Collectives started and not yet taken by a wait op (collectives.tf's tests look).
extern "C" int64_t collectives_tf_in_flight() { return static_cast<int64_t>(registry().size()); }

// An eager caller's start that no wait op will take (its step failed): its buffers are freed once
// the collective ends (finished() holds them until then).
extern "C" void collectives_tf_forget(int64_t handle) { registry().take(handle); }

// Called once by Python after loading: 0, or -1 if the core's C API is of another version.
extern "C" int collectives_tf_bind(const collectives_c_api* table) {
  if (table == nullptr || table->version != COLLECTIVES_C_API_VERSION) return -1;
  api = table;
  return 0;
}
