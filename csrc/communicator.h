// A communicator runs collectives among the ranks of a group over one Transport. Collectives
// are queued and executed one at a time, in call order, by the communicator's own thread, so
// async calls from any thread keep the order every rank must agree on, and the caller
// (Python, with the GIL released) only waits; a blocking call finds the queue empty most often,
// and then runs on the caller's thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "algorithms/algorithm.h"
#include "algorithms/allreduce.h"
#include "algorithms/allreduce_board.h"
#include "algorithms/allreduce_hierarchical.h"
#include "algorithms/hierarchical_collectives.h"
#include "algorithms/allreduce_recursive_doubling.h"
#include "algorithms/allreduce_ring.h"
#include "algorithms/group.h"
#include "algorithms/reduction_server.h"
#include "algorithms/select.h"
#include "common/error.h"
#include "common/types.h"
#include "transport/transport.h"

namespace collectives {

struct CommunicatorOptions {
  double timeout_seconds = 300;
  size_t segment_bytes = 0;  // 0: chosen per message size
  bool debug = false;        // log each collective's phases on stderr
  bool reduction_server = false;  // allreduce goes through the reducers
  ReductionServerSettings reduction_server_settings;
  CostModel cost;  // chooses between the ring and recursive doubling; equal on every rank
  HierarchyPlan hierarchy;  // the hierarchical algorithm's plan, equal on every rank; none if empty
  // All-reduces of up to this many bytes take the host's shared board, where the communicator
  // has one (allreduce_board.h; by default all); 0: none does.
  size_t board_up_to_bytes = kBoardDefaultUpToBytes;
};

// Bytes a collective reads or writes.
struct MemoryRange {
  const char* begin;
  const char* end;
  bool overlaps(const MemoryRange& other) const { return begin < other.end && other.begin < end; }
};

// One queued collective, or one point-to-point message. Waiting rethrows the collective's
// CollectiveError or TimeoutError.
class Work {
 public:
  // True once finished (rethrowing its failure); false if `seconds` passed first.
  bool wait_for(double seconds);
  bool done();
  // Collectives only (a message's Work finishes when waited on): calls `callback` with the
  // collective's error (null on success) once it is finished: at once, on this thread, if it is;
  // otherwise on the thread that finishes it (the communicator's), after waiters were woken.
  // So it must not block: it is how compiled callers (the C API) wait without a thread.
  void when_done(std::function<void(std::exception_ptr)> callback);
  // A received message: the communicator rank it came from (from any source: once done, -1
  // before); -1 for every other Work.
  int source() const { return source_.load(); }

 private:
  friend class Communicator;
  friend class StagedAllreduce;  // a staged call's Work: done once its last piece is copied back
  void finish(std::exception_ptr error);

  // A point-to-point message is not queued: the Work waits on its transport request itself,
  // so that a message and a collective (or two messages) never wait on each other.
  struct Message {
    std::weak_ptr<Transport> transport;  // gone once the communicator is closed
    TransportRequest request;
    Deadline deadline;
    std::string what;  // "send/recv #3 (tag 0, 10 x float32) to rank 2"
    int rank;          // this rank, for messages
    std::vector<int> members;  // the communicator's global ranks, in its order
  };
  std::optional<Message> message_;  // set once, before the Work is handed out

  std::mutex mutex_;
  std::condition_variable finished_;
  bool done_ = false;
  std::exception_ptr error_;
  std::vector<std::function<void(std::exception_ptr)>> callbacks_;  // when_done's, until finished
  std::atomic<int> source_{-1};
};

// When a queued all-reduce's input is ready: a staged copy (staging/staged_allreduce.h) opens
// it once the data is in place. The communicator starts the all-reduce no earlier (nor sends any
// of it ahead of its turn); opened with an error, the all-reduce fails with it, and aborts the
// communicator as any failure does (the peers are told).
class InputGate {
 public:
  void open(std::exception_ptr error);
  bool is_open();
  // Returns once open, or rethrows the error it was opened with; TimeoutError past `deadline`.
  void wait(Deadline deadline);

 private:
  std::mutex mutex_;
  std::condition_variable opened_;
  bool open_ = false;
  std::exception_ptr error_;
};

class Communicator {
 public:
  // Over every rank of `transport`; reducer_links[r]: the connected, authenticated socket to
  // reducer r (none: no reducers). All are owned from here on. board_expected: every rank runs
  // on one host, and each should have the host's board (its members: every rank, in rank
  // order); `board` is this rank's (null if it did not get it: allreduce_board.h).
  Communicator(std::unique_ptr<Transport> transport, CommunicatorOptions options,
               std::vector<Link> reducer_links = {}, std::vector<std::string> reducer_names = {},
               bool board_expected = false, std::unique_ptr<ShmBoard> board = nullptr);
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return group_.index(); }
  int size() const { return group_.size(); }
  // The global ranks (of the transport) of this communicator's members, in its order.
  std::vector<int> members() const;

  // A communicator over `ranks` (members of this one, each once, in the new order), sharing
  // this one's transport and connections: each of those ranks must call it, and no other
  // rank (it is made locally, without a collective; comm.split in Python agrees on `ranks`
  // first, torch's new_group knows them). Its collectives are told apart from every other
  // communicator's on the shared connections by an id that the members derive alike, from
  // `ranks` and how many communicators over the same list this process made before. The
  // reducers serve the world only. A failure of any communicator over the transport fails
  // them all (they share its connections). `cost` chooses its all-reduces (select.h); this
  // one's where none is given; `hierarchy` is its own plan (indices of the subgroup), if any.
  std::unique_ptr<Communicator> subgroup(const std::vector<int>& ranks, std::optional<CostModel> cost = std::nullopt,
                                         HierarchyPlan hierarchy = {});

  // Buffers must stay valid until the returned Work is done. `caller`: the caller will block
  // on the Work at once, and lends its thread: if no other collective is queued or running,
  // the collective runs on it (the Work is done on return), asking `caller` between waits
  // whether to give up (Interrupted). Otherwise, and without `caller`, the communicator's
  // thread runs it. An all-reduce with `ready` waits for that gate at its turn (never with a
  // `caller`).
  std::shared_ptr<Work> allreduce(void* data, size_t count, DataType dtype, ReduceOp op,
                                  Interruption* caller = nullptr, std::shared_ptr<InputGate> ready = nullptr);
  std::shared_ptr<Work> allgather(const void* input, void* output, size_t count, DataType dtype,
                                  Interruption* caller = nullptr);
  std::shared_ptr<Work> broadcast(void* data, size_t count, DataType dtype, int root,
                                  Interruption* caller = nullptr);
  std::shared_ptr<Work> reduce_scatter(const void* input, void* output, size_t count, DataType dtype, ReduceOp op,
                                       Interruption* caller = nullptr);
  std::shared_ptr<Work> barrier(Interruption* caller = nullptr);
  // Rooted collectives (root: a rank of this communicator). reduce: in place on the root, the
  // others' data left as it was. gather: root's output holds size() * count elements, block r
  // rank r's input (output unused elsewhere). scatter: block r of root's input (size() * count
  // elements) lands in rank r's output (input unused elsewhere).
  std::shared_ptr<Work> reduce(void* data, size_t count, DataType dtype, ReduceOp op, int root,
                               Interruption* caller = nullptr);
  std::shared_ptr<Work> gather(const void* input, void* output, size_t count, DataType dtype, int root,
                               Interruption* caller = nullptr);
  std::shared_ptr<Work> scatter(const void* input, void* output, size_t count, DataType dtype, int root,
                                Interruption* caller = nullptr);
  // All-to-all with uneven splits: send_counts[j] elements of input (packed in rank order) go
  // to rank j, recv_counts[j] elements from rank j land in output (packed in rank order).
  // Every pair must agree: rank j's send_counts[i] == rank i's recv_counts[j].
  std::shared_ptr<Work> alltoall(const void* input, std::vector<size_t> send_counts, void* output,
                                 std::vector<size_t> recv_counts, DataType dtype, Interruption* caller = nullptr);
  /*
   * Point to point, tagged (tag >= 0), as MPI and Gloo: not queued behind collectives and not
   * collective (only the two ranks take part). Messages from one rank to another with the
   * same tag are received in the order sent; those with different tags travel on lanes of
   * their own (FrameHeader::comm), so that a receiver may take them in another order. The
   * receiver must expect the sender's count and dtype: the header says them, and a receive
   * that expects others fails the communicator (on every rank) before a byte lands.
   */
  std::shared_ptr<Work> send(const void* data, size_t count, DataType dtype, int peer, uint32_t tag);
  std::shared_ptr<Work> recv(void* data, size_t count, DataType dtype, int peer, uint32_t tag);
  // The first message with `tag` that any other rank sends this one (MPI_ANY_SOURCE), unless a
  // receive posted before it for that sender takes it (Transport::recv_any); Work::source() says
  // who sent it. std::invalid_argument where the transport cannot (UCX).
  std::shared_ptr<Work> recv_any(void* data, size_t count, DataType dtype, uint32_t tag);
  // Bytes exchanged with each reducer, and whether it is still in use.
  std::vector<ReducerStat> reducer_stats() const;

  // Local: every pending and later collective fails with CollectiveError; peers are told.
  void abort(const std::string& reason);
  // Local, idempotent: fails what is still queued, tells peers goodbye, closes the sockets.
  void close();

 private:
  struct Task {
    CollectiveTag tag;
    std::function<void(const AlgorithmContext&)> run;  // all but all-reduces
    // All-reduces: the algorithm, and the call made of it when the task is queued.
    AllreduceAlgorithm* allreduce = nullptr;
    void* data = nullptr;
    std::unique_ptr<AllreduceCall> call;
    std::shared_ptr<InputGate> ready;  // null: its input is ready when queued
    std::shared_ptr<Work> work;
    std::vector<MemoryRange> memory;
  };
  // Communicators made from one world, for the ids of their subgroups.
  struct Lineage {
    std::mutex mutex;
    std::map<std::vector<int>, uint64_t> made;  // how many over each list of ranks
  };
  Communicator(std::shared_ptr<Transport> transport, std::shared_ptr<Lineage> lineage, Group group,
               uint64_t id, CommunicatorOptions options);
  std::shared_ptr<Work> enqueue(Task task, Interruption* caller);
  std::shared_ptr<Work> message(bool is_send, void* data, size_t count, DataType dtype, int peer, uint32_t tag);
  void check_root(int root) const;
  void execute_loop();
  void begin_locked(Task& task);  // marks it running, and lets it start
  std::exception_ptr aborted_earlier_locked(const Task& task) const;  // its error after failure_
  void execute(Task& task, Transport& transport, Interruption* caller);
  void start_ahead_locked();
  void make_hierarchical();
  // auto's (or the forced) all-reduce for `count` elements; with_board: the board may be it.
  AllreduceAlgorithm& choose_allreduce(size_t count, DataType dtype, bool with_board);
  // The plan, where an all-gather, reduce-scatter or broadcast of `count` elements in all is to
  // take it (select_hierarchical); null otherwise.
  Hierarchy* hierarchical_for(CollectiveKind kind, size_t count, DataType dtype);  // from options_.hierarchy, if any (std::invalid_argument if it breaks the rules)

  const CommunicatorOptions options_;
  std::shared_ptr<Transport> transport_;  // shared with the subgroups
  const std::shared_ptr<Lineage> lineage_;
  const Group group_;
  const uint64_t id_;  // FrameHeader::comm: 0 for the world
  RingAllreduce ring_;
  RecursiveDoublingAllreduce recursive_doubling_;
  std::unique_ptr<ReductionServerAllreduce> reduction_server_;  // null without reducers
  std::unique_ptr<Hierarchy> hierarchy_;  // null without a plan
  std::unique_ptr<HierarchicalAllreduce> hierarchical_;  // over hierarchy_
  std::unique_ptr<ShmBoard> board_;  // the world's only; null without one
  std::unique_ptr<BoardAllreduce> board_allreduce_;  // over board_, where one is expected
  std::vector<char> scratch_;  // the executor's staging memory

  std::mutex mutex_;  // guards the fields below
  std::condition_variable queued_;
  std::deque<Task> queue_;
  uint64_t next_seq_ = 0;
  bool closing_ = false;
  bool running_ = false;  // the executor or a caller's thread is inside a collective
  std::thread::id caller_thread_;  // the caller's thread inside one, if that is who runs it
  bool close_when_done_ = false;   // close() was called from inside it: closes once it has unwound
  std::vector<MemoryRange> running_memory_;  // what the collective in flight reads or writes
  std::string failure_;  // set once a collective failed: the communicator is aborted
  // Messages sent so far, by (peer's global rank, tag): the next one's number.
  std::map<std::pair<int, uint32_t>, uint64_t> sent_;
  std::vector<std::weak_ptr<Work>> messages_;  // posted, perhaps unfinished: close() ends them
  std::thread executor_;
};

}  // namespace collectives
