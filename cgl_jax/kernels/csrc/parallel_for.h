// ParallelFor over XLA's intra-op thread pool, shared by the CPU kernels.
#ifndef CGL_JAX_CSRC_PARALLEL_FOR_H_
#define CGL_JAX_CSRC_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace cgl_jax {

// Runs body(begin, end) over [0, n) in chunks claimed from a shared counter by
// the calling thread and by helpers scheduled on the pool. The caller waits only
// for chunks that were claimed, so a helper that starts late (the pool busy with
// other work) finds nothing left and returns: no deadlock, no idle wait for it.
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, const Body& body) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (threads == 1 || n < 2) {
    body(0, n);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, n / (4 * threads));
  const int64_t num_chunks = (n + chunk - 1) / chunk;
  struct State {
    std::atomic<int64_t> next{0};
    std::mutex mutex;
    std::condition_variable all_done;
    int64_t done = 0;
  };
  auto state = std::make_shared<State>();
  // `body` is only touched after claiming a chunk, and the caller returns only
  // once every claimed chunk is done, so the reference outlives every use.
  auto run = [state, n, chunk, num_chunks, &body]() {
    int64_t finished = 0;
    for (int64_t c = state->next.fetch_add(1); c < num_chunks; c = state->next.fetch_add(1)) {
      body(c * chunk, std::min(n, (c + 1) * chunk));
      ++finished;
    }
    if (finished > 0) {
      std::lock_guard<std::mutex> lock(state->mutex);
      state->done += finished;
      if (state->done == num_chunks) state->all_done.notify_all();
    }
  };
  for (int64_t t = 1; t < std::min(threads, num_chunks); ++t) pool.Schedule([run] { run(); });
  run();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->all_done.wait(lock, [&] { return state->done == num_chunks; });
}

}  // namespace cgl_jax

#endif  // CGL_JAX_CSRC_PARALLEL_FOR_H_
