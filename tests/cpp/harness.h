// What the C++ tests share: checks, loopback sockets, and a job of ranks as threads (with
// reducers as threads too, for the reduction server).
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "communicator.h"
#include "fake_transport.h"
#include "reduction_server/server.h"
#include "transport/router.h"
#include "transport/shm/segment.h"
#include "transport/shm/shm_transport.h"
#include "transport/tcp_transport.h"
#include "transport/wire_security.h"

namespace collectives {
namespace testing {

inline int failures = 0;

inline void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

// Cost models that make select_allreduce() always pick one algorithm of the ring family:
// messages free (the ring moves fewer bytes), or bytes free (recursive doubling waits on
// fewer messages).
inline CostModel always_ring() { return {0.0, 1.0}; }
inline CostModel always_recursive_doubling() { return {1.0, 0.0}; }

// A connected pair of loopback TCP sockets: {accepted end, connecting end}.
inline std::pair<int, int> loopback_pair() {
  int listener = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (bind(listener, reinterpret_cast<sockaddr*>(&addr), len) != 0 || listen(listener, 1) != 0 ||
      getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    throw std::runtime_error("loopback listen failed");
  }
  int client = socket(AF_INET, SOCK_STREAM, 0);
  if (connect(client, reinterpret_cast<sockaddr*>(&addr), len) != 0) {
    throw std::runtime_error("loopback connect failed");
  }
  int server = accept(listener, nullptr, nullptr);
  close(listener);
  return {server, client};
}

// The wire security of the jobs a test makes; each test program runs its tests under each.
inline WireSecurity job_security = WireSecurity::kMac;

// The transport between the ranks of the jobs a test makes: TCP over loopback, shared memory,
// both routed (ranks of even and odd numbers on two "hosts": shared memory between ranks of
// one parity, TCP across), or the in-memory fake (whose faults a test injects through
// Job::network).
enum class TransportKind { kTcp, kShm, kRouted, kFake };
inline TransportKind job_transport = TransportKind::kTcp;
// With the shared-memory transport: the ranks also share a board (every rank of one host).
inline bool job_board = false;
inline int job_board_missing = -1;  // a rank that did not get the board (its pairing failed)
inline const char* to_string(TransportKind kind) {
  switch (kind) {
    case TransportKind::kTcp: return "tcp";
    case TransportKind::kShm: return "shm";
    case TransportKind::kRouted: return "routed tcp and shm";
    case TransportKind::kFake: return "fake";
  }
  return "?";
}

inline std::string random_key() {
  static std::random_device device;
  std::string key(kSessionKeyBytes, '\0');
  for (char& c : key) c = static_cast<char>(device());
  return key;
}

// Both ends of a loopback connection as the handshake would hand them over: {accepted end,
// connecting end}, each sending with the key the other receives with.
inline std::pair<Link, Link> loopback_link() {
  auto [server, client] = loopback_pair();
  const std::string to_client = random_key(), to_server = random_key();
  return {Link{server, job_security, to_client, to_server}, Link{client, job_security, to_server, to_client}};
}

// A connection through a relay thread that moves bytes both ways until cut(): from then on it
// moves none and closes nothing, as a partition (the peers see neither data nor an end).
class Relay {
 public:
  // {end at `near`'s side, end at the far side}, joined by the relay; the keys as in
  // loopback_link().
  Relay() {
    auto [near, relay_near] = loopback_pair();
    auto [relay_far, far] = loopback_pair();
    const std::string to_far = random_key(), to_near = random_key();
    ends_ = {Link{near, job_security, to_far, to_near}, Link{far, job_security, to_near, to_far}};
    fds_[0] = relay_near;
    fds_[1] = relay_far;
    thread_ = std::thread([this] { pump(); });
  }
  ~Relay() {
    stopping_ = true;
    thread_.join();
    ::close(fds_[0]);
    ::close(fds_[1]);
  }
  const std::pair<Link, Link>& ends() const { return ends_; }
  void cut() { cut_ = true; }

 private:
  void pump() {
    char buffer[64 << 10];
    bool open[2] = {true, true};
    while (!stopping_ && (open[0] || open[1])) {
      pollfd pfds[2] = {{open[0] ? fds_[0] : -1, POLLIN, 0}, {open[1] ? fds_[1] : -1, POLLIN, 0}};
      if (cut_ || poll(pfds, 2, 10) <= 0) {
        if (cut_) std::this_thread::sleep_for(std::chrono::milliseconds(10));
        continue;
      }
      for (int i = 0; i < 2; ++i) {
        if (!(pfds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        ssize_t n = ::recv(fds_[i], buffer, sizeof(buffer), 0);
        if (n <= 0) {  // that side ended: so does the other's stream from it
          ::shutdown(fds_[1 - i], SHUT_WR);
          open[i] = false;
          continue;
        }
        for (ssize_t sent = 0; sent < n && !stopping_;) {
          pollfd out{fds_[1 - i], POLLOUT, 0};
          if (poll(&out, 1, 10) <= 0) continue;
          ssize_t m = ::send(fds_[1 - i], buffer + sent, n - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
          if (m < 0 && errno != EAGAIN) break;  // gone: its own end says so to the far side
          sent += std::max<ssize_t>(m, 0);
        }
      }
    }
  }

  std::pair<Link, Link> ends_;
  int fds_[2];
  std::atomic<bool> cut_{false}, stopping_{false};
  std::thread thread_;
};

// links[r][p]: `connections` loopback connections between r and p.
inline std::vector<std::vector<std::vector<Link>>> loopback_mesh(int size, int connections) {
  std::vector<std::vector<std::vector<Link>>> links(size, std::vector<std::vector<Link>>(size));
  for (int i = 0; i < size; ++i) {
    for (int j = i + 1; j < size; ++j) {
      for (int c = 0; c < connections; ++c) {
        auto [server, client] = loopback_link();
        links[i][j].push_back(server);
        links[j][i].push_back(client);
      }
    }
  }
  return links;
}

// Shared-memory links among ranks that are threads of this process, between every two ranks
// of the same host(r): a segment and a socket pair each (a rank's end of the pair stands for
// its process: it closes with the rank's transport), and a doorbell per rank. `by_reference`:
// large messages are copied from the sender's memory (this process's), else through the rings.
struct ShmMesh {
  std::vector<int> doorbells;                // [rank]
  std::vector<std::vector<ShmLink>> links;  // [rank][peer]
};

inline ShmMesh shm_mesh(int size, const std::function<int(int)>& host, bool by_reference) {
  ShmMesh mesh{std::vector<int>(size), std::vector<std::vector<ShmLink>>(size, std::vector<ShmLink>(size))};
  for (int r = 0; r < size; ++r) mesh.doorbells[r] = create_shm_doorbell();
  for (int i = 0; i < size; ++i) {
    for (int j = i + 1; j < size; ++j) {
      if (host(i) != host(j)) continue;
      int ends[2];
      if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, ends) != 0) throw std::runtime_error("socketpair failed");
      const int segment = create_shm_segment();
      const int pid = by_reference ? getpid() : 0;
      mesh.links[i][j] = {segment, ends[0], dup(mesh.doorbells[j]), pid};
      mesh.links[j][i] = {dup(segment), ends[1], dup(mesh.doorbells[i]), pid};
    }
  }
  return mesh;
}

// The transports of `size` ranks (names[r] for rank r) over job_transport, but the fake.
inline std::vector<std::unique_ptr<Transport>> real_transports(int size, int connections,
                                                               const std::vector<std::string>& names) {
  std::vector<std::unique_ptr<Transport>> transports;
  if (job_transport == TransportKind::kShm) {
    ShmMesh mesh = shm_mesh(size, [](int) { return 0; }, /*by_reference=*/true);
    for (int r = 0; r < size; ++r) {
      transports.push_back(std::make_unique<ShmTransport>(r, size, mesh.doorbells[r], mesh.links[r], names));
    }
    return transports;
  }
  auto links = loopback_mesh(size, connections);
  // Routed: the shared-memory part moves large messages through its rings.
  ShmMesh mesh = job_transport == TransportKind::kRouted ? shm_mesh(size, [](int r) { return r % 2; }, false) : ShmMesh{};
  for (int r = 0; r < size; ++r) {
    if (job_transport == TransportKind::kRouted) {
      transports.push_back(make_transport(r, size, links[r], names, mesh.doorbells[r], mesh.links[r]));
    } else {
      transports.push_back(std::make_unique<TcpTransport>(r, size, links[r], names));
    }
  }
  return transports;
}

// `size` ranks and `num_reducers` reducers (each serving on its own thread), the ranks
// connected by job_transport, the reducers over loopback. With reducers, options.reduction_server decides whether allreduce uses them. The
// last `silent_reducers` of them never answer, like a hung host or a cut link. The connection
// between rank relayed.first and reducer relayed.second goes through `relay`, to be cut.
struct Job {
  std::shared_ptr<FakeNetwork> network;  // the ranks' network, with the fake transport
  std::vector<std::unique_ptr<Communicator>> comms;
  std::vector<std::unique_ptr<ReductionServer>> reducers;
  std::vector<Link> silent_links;  // the reducer ends of the silent reducers' connections
  std::vector<std::string> reducer_errors;  // what each reducer's serve() threw
  std::vector<std::thread> reducer_threads;
  std::unique_ptr<Relay> relay;

  Job(int size, int connections = 1, size_t segment_bytes = 0, double timeout = 30, CostModel cost = {})
      : Job(size, 0, [&] {
          CommunicatorOptions options;
          options.timeout_seconds = timeout;
          options.segment_bytes = segment_bytes;
          options.cost = cost;
          return options;
        }(), connections) {}

  Job(int size, int num_reducers, CommunicatorOptions options, int connections = 1,
      ReducerOptions reducer_options = {}, int silent_reducers = 0,
      std::pair<int, int> relayed = {-1, -1}) {
    std::vector<std::string> names, reducer_names;
    for (int r = 0; r < size; ++r) names.push_back("rank " + std::to_string(r));
    std::vector<std::unique_ptr<Transport>> transports;
    if (job_transport == TransportKind::kFake) {
      network = std::make_shared<FakeNetwork>(size);
      transports = network->transports();
    } else {
      transports = real_transports(size, connections, names);
    }
    for (int k = 0; k < num_reducers; ++k) reducer_names.push_back("reducer " + std::to_string(k));
    // reducer_links[r][k] joins rank r and reducer k.
    std::vector<std::vector<Link>> reducer_links(size), worker_links(num_reducers);
    for (int r = 0; r < size; ++r) {
      for (int k = 0; k < num_reducers; ++k) {
        const bool through_relay = relayed == std::pair<int, int>{r, k};
        if (through_relay) relay = std::make_unique<Relay>();
        auto [at_reducer, at_worker] = through_relay ? relay->ends() : loopback_link();
        worker_links[k].push_back(at_reducer);
        reducer_links[r].push_back(at_worker);
      }
    }
    const int serving = num_reducers - silent_reducers;
    for (int k = serving; k < num_reducers; ++k) {
      silent_links.insert(silent_links.end(), worker_links[k].begin(), worker_links[k].end());
    }
    reducer_errors.resize(serving);
    for (int k = 0; k < serving; ++k) {
      reducers.push_back(std::make_unique<ReductionServer>(worker_links[k], names, reducer_options));
    }
    for (int k = 0; k < serving; ++k) {
      reducer_threads.emplace_back([this, k] {
        try {
          reducers[k]->serve();
        } catch (const std::exception& e) {
          reducer_errors[k] = e.what();
        }
      });
    }
    FileDescriptor board(job_board && job_transport == TransportKind::kShm && size > 1 ? create_shm_board(size) : -1);
    std::vector<int> world(size);
    for (int r = 0; r < size; ++r) world[r] = r;
    for (int r = 0; r < size; ++r) {
      auto shared = board.get() >= 0 && r != job_board_missing
                        ? std::make_unique<ShmBoard>(FileDescriptor(dup(board.get())), world, r)
                        : nullptr;
      comms.push_back(std::make_unique<Communicator>(std::move(transports[r]), options, reducer_links[r],
                                                     reducer_names, board.get() >= 0, std::move(shared)));
    }
  }

  ~Job() { finish(); }

  // Closes every worker and waits for the reducers' serve() to return (reducer_errors are
  // final then). Idempotent.
  void finish() {
    comms.clear();  // goodbyes: the reducers' serve() returns
    relay.reset();  // its reducer sees the end of a connection it may still wait on
    for (auto& t : reducer_threads) t.join();
    reducer_threads.clear();
    for (const Link& link : silent_links) close(link.fd);
    silent_links.clear();
  }

  // Runs body(rank) on one thread per rank; returns each rank's exception text ("" if none).
  std::vector<std::string> run(const std::function<void(int)>& body) {
    std::vector<std::string> errors(comms.size());
    std::vector<std::thread> threads;
    for (size_t r = 0; r < comms.size(); ++r) {
      threads.emplace_back([&, r] {
        try {
          body(static_cast<int>(r));
        } catch (const std::exception& e) {
          errors[r] = e.what();
          if (errors[r].empty()) errors[r] = "?";
        }
      });
    }
    for (auto& t : threads) t.join();
    return errors;
  }
};

// Small integers: every sum, product and average is exact or rounded once, identically.
template <typename T>
std::vector<T> rank_data(int rank, size_t count, unsigned seed) {
  std::mt19937 gen(seed * 131 + rank);
  std::uniform_int_distribution<int> dist(-3, 3);
  std::vector<T> v(count);
  for (auto& x : v) x = static_cast<T>(dist(gen));
  return v;
}

inline void wait(const std::shared_ptr<Work>& work) {
  while (!work->wait_for(1.0)) {
  }
}

}  // namespace testing
}  // namespace collectives
