// A caching allocator for large CPU tensors (torch.ops.rlhf_kernels.install_cpu_allocator).
//
// Why: a training step on a CPU allocates and frees the same large activations every step. glibc serves
// blocks between its mmap threshold (128 KiB, raised dynamically up to 32 MiB as large blocks are freed)
// from its heap, where they fragment: measured on SmolLM2-135M (DPO step, 2 threads), about 700 MiB of a
// ~1.9 GiB peak was heap that was free but resident. Forcing every large block to its own mapping gave the
// memory back but made the step 1.8x slower: each fresh mapping page-faults on first touch, and faults are
// expensive on a VM. This allocator keeps both: every block of at least min_bytes is its own anonymous
// mapping (no heap to fragment), and a freed block is kept, by size class, for the next request of that
// class (no new page faults when the shapes repeat, as they do step after step).
//
// Bounded: on a miss, idle blocks (least recently freed first) are unmapped while mapping the new one would
// take the bytes mapped past the peak of live blocks so far plus 1/8 of it (at least 64 MiB). So what the
// allocator holds stays within 1/8 of the live peak (each block rounded up to its size class, at most 1/8
// above its request), while a step's temporaries, freed and asked for again a moment later, are reused.
// A request takes an idle block of its class, or of a class at most 1/4 above it (best fit).

// Size classes: a request is rounded up to a page, then to a multiple of 1/8 of its power of two (waste at
// most 12.5%). Blocks below min_bytes, and every request before installation, go to the allocator that was
// installed before (c10's default: posix_memalign). Thread-safe (one mutex; a large allocation is rare
// next to the work done on it). The instance is never destroyed: tensors may outlive static destructors.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <cstdint>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kReuseSlack = 4;         // an idle block up to 1/4 larger than the request's class serves it
constexpr size_t kMinSlack = size_t{64} << 20;  // idle bytes always allowed beyond the live peak

size_t size_class(size_t n) {
  size_t bytes = (n + kPage - 1) / kPage * kPage;
  size_t pow2 = size_t{1} << (63 - __builtin_clzll(static_cast<unsigned long long>(bytes)));
  size_t step = std::max(pow2 / 8, kPage);
  return (bytes + step - 1) / step * step;
}

void* map_block(size_t bytes) {
  return mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
}

void release_block(void* ptr);

class CachingCPUAllocator final : public c10::Allocator {
 public:
  CachingCPUAllocator(c10::Allocator* fallback, size_t min_bytes) : fallback_(fallback), min_bytes_(min_bytes) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < min_bytes_) return fallback_->allocate(n);
    size_t bytes = size_class(n);
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      // an idle block of this class, or of a class at most 1/kReuseSlack above it (best fit; idle_ holds
      // no empty class)
      auto it = idle_.lower_bound(bytes);
      if (it != idle_.end() && it->first <= bytes + bytes / kReuseSlack) {
        auto pos = it->second.back();
        bytes = it->first;
        ptr = pos->first;
        it->second.pop_back();
        if (it->second.empty()) idle_.erase(it);
        lru_.erase(pos);
        ++hits_;
      } else {
        ++misses_;
        // unmap idle blocks, least recently freed first, while mapping this one would pass the limit:
        // the peak of live blocks so far (this one counted) plus a slack of 1/8 of it
        size_t peak = std::max(peak_live_, live_bytes_ + bytes);
        size_t limit = peak + std::max(peak / 8, kMinSlack);
        while (mapped_bytes_ + bytes > limit && !lru_.empty()) evict_oldest();
        ptr = map_block(bytes);
        if (ptr == MAP_FAILED) {
          TORCH_CHECK_WITH(OutOfMemoryError, false, "rlhf_kernels CPU allocator: cannot map ", bytes, " bytes");
        }
        mapped_bytes_ += bytes;
        peak_mapped_ = std::max(peak_mapped_, mapped_bytes_);
      }
      live_[ptr] = bytes;
      live_bytes_ += bytes;
      peak_live_ = std::max(peak_live_, live_bytes_);
    }
    return {ptr, ptr, &release_block, c10::Device(c10::DeviceType::CPU)};
  }

  void release(void* ptr) {
    std::unique_lock<std::mutex> lock(mu_);
    auto it = live_.find(ptr);
    if (it == live_.end()) {  // raw_deallocate of a block below min_bytes: the fallback allocated it
      lock.unlock();
      c10::DeleterFnPtr fallback_delete = fallback_->raw_deleter();
      TORCH_INTERNAL_ASSERT(fallback_delete != nullptr, "rlhf_kernels CPU allocator: a raw block it cannot free");
      fallback_delete(ptr);
      return;
    }
    size_t bytes = it->second;
    live_.erase(it);
    live_bytes_ -= bytes;
    lru_.emplace_back(ptr, bytes);
    idle_[bytes].push_back(std::prev(lru_.end()));
  }

  // Unmap every idle block (what torch.ops.rlhf_kernels.cpu_allocator_trim does).
  int64_t trim() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t freed = 0;
    for (auto& [p, bytes] : lru_) {
      munmap(p, bytes);
      freed += static_cast<int64_t>(bytes);
    }
    mapped_bytes_ -= static_cast<size_t>(freed);
    lru_.clear();
    idle_.clear();
    return freed;
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(min_bytes_), static_cast<int64_t>(live_bytes_),
            static_cast<int64_t>(mapped_bytes_ - live_bytes_),  // idle: every mapped block is live or idle
            static_cast<int64_t>(mapped_bytes_), static_cast<int64_t>(peak_mapped_), static_cast<int64_t>(peak_live_),
            hits_, misses_, evictions_};
  }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  // raw_allocate / raw_deallocate (used inside ATen, e.g. by oneDNN's scratch buffers) free through this:
  // a block of ours returns to the cache, any other pointer goes to the fallback's own deleter.
  c10::DeleterFnPtr raw_deleter() const override { return &release_block; }

 private:
  void evict_oldest() {  // with mu_ held
    auto [old, old_bytes] = lru_.front();
    auto cls = idle_.find(old_bytes);
    auto& list = cls->second;
    for (auto p = list.begin(); p != list.end(); ++p) {
      if ((*p)->first == old) {
        list.erase(p);
        break;
      }
    }
    if (list.empty()) idle_.erase(cls);
    lru_.pop_front();
    munmap(old, old_bytes);
    mapped_bytes_ -= old_bytes;
    ++evictions_;
  }

  using Lru = std::list<std::pair<void*, size_t>>;
  c10::Allocator* fallback_;
  size_t min_bytes_;
  std::mutex mu_;
  Lru lru_;                                                     // idle blocks, least recently freed first
  std::map<size_t, std::vector<Lru::iterator>> idle_;  // size class -> its idle blocks (never empty)
  std::unordered_map<void*, size_t> live_;                      // block -> its size class
  size_t live_bytes_ = 0, mapped_bytes_ = 0, peak_mapped_ = 0, peak_live_ = 0;
  int64_t hits_ = 0, misses_ = 0, evictions_ = 0;
};

CachingCPUAllocator* g_allocator = nullptr;  // leaked on purpose (see the top)
std::mutex g_install_mu;

void release_block(void* ptr) { g_allocator->release(ptr); }

// Route CPU tensors of at least min_bytes through the caching allocator from now on; the first call
// installs it, a later one only reports whether it is in place (its min_bytes stays the first call's).
bool install_cpu_allocator(int64_t min_bytes) {
  TORCH_CHECK(min_bytes >= static_cast<int64_t>(kPage), "install_cpu_allocator: min_bytes must be at least ", kPage);
  std::lock_guard<std::mutex> lock(g_install_mu);
  if (g_allocator == nullptr) {
    g_allocator = new CachingCPUAllocator(c10::GetCPUAllocator(), static_cast<size_t>(min_bytes));
  }
  // the highest priority: a later SetCPUAllocator of lower priority cannot displace it unnoticed
  c10::SetCPUAllocator(g_allocator, /*priority=*/UINT8_MAX);
  return c10::GetCPUAllocator() == g_allocator;
}

bool cpu_allocator_installed() { return g_allocator != nullptr && c10::GetCPUAllocator() == g_allocator; }

// [min_bytes, live, idle, mapped, peak mapped, peak live (bytes), hits, misses, evictions]; empty before
// installation.
std::vector<int64_t> cpu_allocator_stats() { return g_allocator ? g_allocator->stats() : std::vector<int64_t>{}; }

int64_t cpu_allocator_trim() { return g_allocator ? g_allocator->trim() : 0; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlhf_kernels, m) {
  m.def("install_cpu_allocator(int min_bytes) -> bool", &install_cpu_allocator);
  m.def("cpu_allocator_installed() -> bool", &cpu_allocator_installed);
  m.def("cpu_allocator_stats() -> int[]", &cpu_allocator_stats);
  m.def("cpu_allocator_trim() -> int", &cpu_allocator_trim);
}
