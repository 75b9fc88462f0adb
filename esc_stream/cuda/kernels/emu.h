// CPU emulation of the few CUDA constructs the kernels in this folder use, so that the test suite can compile the
// exact .cu text with g++ (-std=c++20 -pthread) and compare it with the PyTorch reference on machines without a GPU.
//
// Blocks run one after another; the threads of a block are real std::threads that meet at a std::barrier in
// __syncthreads(), so a kernel that forgets a barrier races here just as it would on a GPU. `__shared__` becomes
// `static`: one array per kernel, shared by the block's threads and reused by the next block (which starts only
// after every thread has left the previous one). threadIdx/blockIdx are thread_local; blockDim/gridDim are global.
#pragma once

#include <barrier>
#include <cstddef>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {
inline thread_local dim3 thread_idx;
inline thread_local dim3 block_idx;
inline dim3 block_dim;
inline dim3 grid_dim;
inline std::barrier<>* block_barrier = nullptr;

// Run `kernel()` for every thread of every block of `grid`, with the CUDA built-ins set as a GPU would.
template <class Kernel>
void launch(dim3 grid, dim3 block, Kernel kernel) {
    grid_dim = grid;
    block_dim = block;
    const std::size_t threads = std::size_t(block.x) * block.y * block.z;
    std::barrier<> barrier(static_cast<std::ptrdiff_t>(threads));
    block_barrier = &barrier;
    std::vector<std::thread> workers;
    workers.reserve(threads);
    for (std::size_t t = 0; t < threads; ++t) {
        workers.emplace_back([&, t] {
            thread_idx = dim3(unsigned(t % block.x), unsigned((t / block.x) % block.y),
                              unsigned(t / (std::size_t(block.x) * block.y)));
            for (unsigned bz = 0; bz < grid.z; ++bz) {
                for (unsigned by = 0; by < grid.y; ++by) {
                    for (unsigned bx = 0; bx < grid.x; ++bx) {
                        block_idx = dim3(bx, by, bz);
                        kernel();
                        barrier.arrive_and_wait();  // the next block reuses the shared arrays
                    }
                }
            }
        });
    }
    for (auto& worker : workers) {
        worker.join();
    }
    block_barrier = nullptr;
}
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
