// Reuse of activation memory across TSGB calls on the CPU.
//
// Why: a forward pass under autograd keeps every activation the backward needs, so each call
// allocates its whole working set afresh (ResNet50, batch 4: ~135 MB). glibc serves blocks that
// large with mmap and gives them back on free, so every call first-touches ~34,000 fresh pages:
// measured, the kernel's page faults and page zeroing were the whole difference between a
// no-grad forward (192 ms) and the converted forward with autograd (240 ms), 48 ms of it.
//
// What: a CPU allocator placed in front of torch's (c10::SetCPUAllocator, installed on first
// use), which routes an allocation to an exact-size free list only on a thread inside an active
// scope (scope_enter/scope_exit: one TSGB call of the native backend). Everything else goes to
// the allocator it wraps, untouched. Blocks freed while any holder is registered
// (hold/release: an explainer's with-block, or one call) go back to the list, whatever thread
// frees them; when the last holder releases, the list is emptied. Blocks still in use then
// (maps and logits handed to the caller) are freed normally when the caller drops them.
//
// Bounds: the list never holds more than the largest working set of a single call since the
// list was last emptied: the bytes that call's own scoped allocations had in use at once. Blocks
// from earlier calls that the caller still holds (maps, logits) do not count, so keeping results
// while batch sizes vary does not raise the bound; it starts again from 0 when the last holder
// releases (the next with-block starts fresh). A miss evicts other sizes first when over it.
// Blocks under kMinBytes skip the list (glibc's small-block heap is already fast).
#include <ATen/ATen.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include "common/tsgb_common.h"

#include <algorithm>
#include <atomic>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace tsgb {
namespace {

constexpr size_t kMinBytes = size_t(64) << 10;

struct Block {
  c10::DataPtr inner;  // owned memory from the wrapped allocator
  size_t size;
  uint64_t call;       // the call (scope) that allocated it last
};

thread_local int tls_depth = 0;
thread_local uint64_t tls_call = 0;  // this thread's current call, while tls_depth > 0

class ActivationCache final : public c10::Allocator {
 public:
  static ActivationCache& get() {
    static ActivationCache* cache = new ActivationCache();  // never destroyed: storages keep it
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    if (tls_depth == 0 || n < kMinBytes) {
      return base_->allocate(n);
    }
    Block* b = nullptr;
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = free_.find(n);
      if (it != free_.end() && !it->second.empty()) {
        b = it->second.back();
        it->second.pop_back();
        cached_ -= n;
        b->call = tls_call;
        live_.emplace(b->inner.get(), b);
        ++hits_;
      } else {
        ++misses_;
        // over the bound: give other sizes back before growing
        for (auto e = free_.begin(); e != free_.end() && cached_ + n > limit(); ++e) {
          while (!e->second.empty() && cached_ + n > limit()) {
            cached_ -= e->second.back()->size;
            evicted.push_back(e->second.back());
            e->second.pop_back();
          }
        }
      }
      in_use_ += n;
      size_t& call_bytes = calls_[tls_call];  // the call is registered by scope_enter
      call_bytes += n;
      if (call_bytes > peak_) peak_ = call_bytes;
    }
    for (Block* e : evicted) delete e;  // frees outside the lock
    if (b == nullptr) {  // a miss: new memory from the wrapped allocator
      b = new Block{base_->allocate(n), n, tls_call};
      std::lock_guard<std::mutex> g(mu_);
      live_.emplace(b->inner.get(), b);
    }
    void* p = b->inner.get();
    // data == context, and a raw deleter: oneDNN's raw_allocate/raw_deallocate need both
    return c10::DataPtr(p, p, &ActivationCache::free_ptr, c10::Device(c10::DeviceType::CPU));
  }

  c10::DeleterFnPtr raw_deleter() const override { return &ActivationCache::free_ptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void hold() {
    install();
    std::lock_guard<std::mutex> g(mu_);
    ++holders_;
  }

  void release() {
    std::vector<Block*> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      TORCH_CHECK(holders_ > 0, "tsgb_ext.activation_cache_release: no holder to release");
      if (--holders_ == 0) {
        for (auto& kv : free_) {
          drop.insert(drop.end(), kv.second.begin(), kv.second.end());
        }
        free_.clear();
        cached_ = 0;
        peak_ = 0;  // calls still running (on other threads) raise it again as they allocate
        for (const auto& kv : calls_) peak_ = std::max(peak_, kv.second);
      }
    }
    for (Block* b : drop) delete b;
  }

  // A call (the outermost scope on a thread) begins / ends: its own bytes in use are counted
  // from 0, and blocks it leaves allocated stop counting towards any call when it ends.
  void call_begin() {
    static std::atomic<uint64_t> next{1};
    tls_call = next.fetch_add(1);
    std::lock_guard<std::mutex> g(mu_);
    calls_[tls_call] = 0;
  }

  void call_end() {
    std::lock_guard<std::mutex> g(mu_);
    calls_.erase(tls_call);
    tls_call = 0;
  }

  // installed: whether torch's CPU allocations go through this object; then counters, and the
  // bound on the cached bytes (the largest working set of a single call)
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {c10::GetCPUAllocator() == this ? 1 : 0, int64_t(holders_), int64_t(cached_),
            int64_t(in_use_), int64_t(hits_), int64_t(misses_), int64_t(limit())};
  }

 private:
  ActivationCache() = default;

  void install() {
    std::call_once(installed_, [this] {
      base_ = c10::GetCPUAllocator();
      // the priority of torch's default allocator; one installed with a higher priority
      // (an extension's own) stays, and then no allocation comes here (stats()[0] == 0)
      c10::SetCPUAllocator(this, /*priority=*/0);
      if (c10::GetCPUAllocator() != this) {
        TORCH_WARN_ONCE("tsgb_ext: another CPU allocator is installed with a higher "
                        "priority; TSGB calls will not reuse activation memory");
      }
    });
  }

  size_t limit() const { return peak_; }

  static void free_ptr(void* p) {
    ActivationCache& c = get();
    Block* drop = nullptr;
    {
      std::lock_guard<std::mutex> g(c.mu_);
      auto it = c.live_.find(p);
      if (it != c.live_.end()) {
        Block* b = it->second;
        c.live_.erase(it);
        c.in_use_ -= b->size;
        if (auto call = c.calls_.find(b->call); call != c.calls_.end()) {
          call->second -= b->size;  // freed while its call runs: part of that working set
        }
        if (c.holders_ > 0 && c.cached_ + b->size <= c.limit()) {
          c.free_[b->size].push_back(b);
          c.cached_ += b->size;
          return;
        }
        drop = b;
      }
    }
    if (drop != nullptr) {
      delete drop;  // frees outside the lock
    } else {  // raw_allocate'd by the wrapped allocator outside a scope
      c.base_->raw_deleter()(p);
    }
  }

  c10::Allocator* base_ = nullptr;
  std::once_flag installed_;
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<Block*>> free_;
  std::unordered_map<void*, Block*> live_;  // handed-out blocks by data pointer
  std::unordered_map<uint64_t, size_t> calls_;  // running calls: their own bytes in use
  size_t holders_ = 0, cached_ = 0, in_use_ = 0, peak_ = 0;
  uint64_t hits_ = 0, misses_ = 0;
};

}  // namespace

// Registered in csrc/ops.cpp (declared in common/tsgb_common.h).
void activation_cache_hold() { ActivationCache::get().hold(); }
void activation_cache_release() { ActivationCache::get().release(); }
void activation_scope_enter() {
  if (tls_depth == 0) ActivationCache::get().call_begin();
  ++tls_depth;
}
void activation_scope_exit() {
  TORCH_CHECK(tls_depth > 0, "tsgb_ext.activation_scope_exit without a matching enter");
  if (--tls_depth == 0) ActivationCache::get().call_end();
}
std::vector<int64_t> activation_cache_stats() { return ActivationCache::get().stats(); }

}  // namespace tsgb
