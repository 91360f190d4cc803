// csrc/mask_gather_cuda.cu — the CUDA kernels of torch.ops.maskmentor.mask_gather and
// mask_gather_backward. setup.py compiles it into the module `maskmentor_C` beside
// mask_gather.cpp (which defines the schemas and the module) only when a CUDA toolkit and
// a CUDA build of torch are present, so that a CPU build never needs CUDA.
//
// The forward is two launches:
//   1. select: one block per (sample, modality). The modality's noise, turned into the
//      order-preserving bits of mask_gather.h, sits in shared memory; each thread ranks
//      its token by counting the tokens whose (noise, index) key is smaller. Keys are
//      distinct, so the ranks are a permutation of 0..N-1 — exact, tie-safe, no sort,
//      no atomics — and a token with rank < n goes to slot offset + rank of ids_keep.
//      O(N^2 / threads) compares per block is nothing for N in the hundreds.
//   2. gather: copy the B*V kept rows of x, as wide (up to 16-byte) vector loads.
//      It is a separate launch because B*K blocks (36 at ViT-B shapes) are too few to
//      saturate memory bandwidth, while B*V*row_bytes/16 threads are plenty.
// Arguments are checked on the host: V (an output size) is a row sum of num_visible, so
// its values must be read back anyway, and the same read validates them.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "mask_gather.h"

namespace maskmentor {
namespace {

constexpr int kCopyThreads = 256;

// Launch 1. grid = B*K blocks, dynamic shared memory = N * 4 bytes.
__global__ void select_kernel(const float* __restrict__ noise, const int64_t* __restrict__ num_visible,
                              int64_t* __restrict__ ids_keep, bool* __restrict__ mask,
                              int64_t K, int64_t N, int64_t V) {
  extern __shared__ uint32_t bits[];  // noise_order_bits of this modality's N tokens
  const int64_t b = blockIdx.x / K, k = blockIdx.x % K;
  const int64_t L = K * N;
  const float* noise_row = noise + b * L + k * N;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) bits[i] = noise_order_bits(noise_row[i]);

  const int64_t n = num_visible[b * K + k];
  int64_t offset = 0;  // this modality's first slot in the visible sequence (K is small)
  for (int64_t j = 0; j < k; ++j) offset += num_visible[b * K + j];
  __syncthreads();

  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const uint64_t mine = (static_cast<uint64_t>(bits[i]) << 32) | static_cast<uint64_t>(i);
    int64_t rank = 0;
    if (n > 0) {  // a modality with no visible token needs no ranks
      for (int64_t j = 0; j < N; ++j) {  // every thread reads bits[j]: a shared-memory broadcast
        rank += ((static_cast<uint64_t>(bits[j]) << 32) | static_cast<uint64_t>(j)) < mine;
      }
    }
    const bool kept = rank < n;
    mask[b * L + k * N + i] = !kept;
    if (kept) ids_keep[b * V + offset + rank] = k * N + i;
  }
}

// Launch 2 (and the backward): move whole rows, as `Vec`-sized chunks, between the
// visible sequence (row b*V + v) and the token sequence (row b*L + ids_keep[b, v]).
// Gather (forward) reads token rows and writes visible rows; scatter (backward) the
// reverse. One thread per chunk, consecutive threads on consecutive chunks of a row, so
// loads and stores are coalesced.
template <typename Vec, bool kScatter>
__global__ void copy_rows_kernel(const Vec* __restrict__ src, Vec* __restrict__ dst,
                                 const int64_t* __restrict__ ids_keep, int64_t V, int64_t L,
                                 int64_t vecs_per_row, int64_t total) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t visible_row = e / vecs_per_row, chunk = e % vecs_per_row;
    const int64_t id = ids_keep[visible_row];
    CUDA_KERNEL_ASSERT(0 <= id && id < L);
    const int64_t token_row = (visible_row / V) * L + id;
    if (kScatter) {
      dst[token_row * vecs_per_row + chunk] = src[visible_row * vecs_per_row + chunk];
    } else {
      dst[visible_row * vecs_per_row + chunk] = src[token_row * vecs_per_row + chunk];
    }
  }
}

template <typename Vec, bool kScatter>
void launch_copy_rows(const void* src, void* dst, const int64_t* ids_keep, int64_t rows, int64_t V,
                      int64_t L, int64_t row_bytes, cudaStream_t stream) {
  const int64_t vecs_per_row = row_bytes / static_cast<int64_t>(sizeof(Vec));
  const int64_t total = rows * vecs_per_row;
  // A grid-stride loop: more blocks than this only add scheduling work.
  const int64_t blocks = std::min<int64_t>((total + kCopyThreads - 1) / kCopyThreads, 1 << 16);
  copy_rows_kernel<Vec, kScatter><<<blocks, kCopyThreads, 0, stream>>>(
      static_cast<const Vec*>(src), static_cast<Vec*>(dst), ids_keep, V, L, vecs_per_row, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The widest chunk (16, 8, 4, 2 or 1 bytes) that divides a row and keeps both base
// pointers aligned: 16 bytes = 4 fp32 or 8 bf16 per load, the widest a thread can issue.
template <bool kScatter>
void copy_rows(const void* src, void* dst, const int64_t* ids_keep, int64_t rows, int64_t V,
               int64_t L, int64_t row_bytes, cudaStream_t stream) {
  if (rows == 0 || row_bytes == 0) return;
  const auto aligned = [&](int64_t w) {
    return row_bytes % w == 0 && reinterpret_cast<uintptr_t>(src) % w == 0 &&
           reinterpret_cast<uintptr_t>(dst) % w == 0;
  };
  if (aligned(16)) {
    launch_copy_rows<uint4, kScatter>(src, dst, ids_keep, rows, V, L, row_bytes, stream);
  } else if (aligned(8)) {
    launch_copy_rows<uint2, kScatter>(src, dst, ids_keep, rows, V, L, row_bytes, stream);
  } else if (aligned(4)) {
    launch_copy_rows<uint32_t, kScatter>(src, dst, ids_keep, rows, V, L, row_bytes, stream);
  } else if (aligned(2)) {
    launch_copy_rows<uint16_t, kScatter>(src, dst, ids_keep, rows, V, L, row_bytes, stream);
  } else {
    launch_copy_rows<uint8_t, kScatter>(src, dst, ids_keep, rows, V, L, row_bytes, stream);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_gather_cuda(const at::Tensor& x_in,
                                                                const at::Tensor& noise_in,
                                                                const at::Tensor& num_visible_in) {
  check_mask_gather_args(x_in, noise_in, num_visible_in, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor noise = noise_in.contiguous();
  const at::Tensor num_visible = num_visible_in.contiguous();
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  const int64_t K = num_visible.size(1), N = L / K;
  // The one synchronisation: V sizes the outputs, and these B*K values are checked.
  const int64_t V = check_visible_counts(num_visible.cpu(), N);

  at::Tensor visible = at::empty({B, V, D}, x.options());
  at::Tensor ids_keep = at::empty({B, V}, x.options().dtype(at::kLong));
  at::Tensor mask = at::empty({B, L}, x.options().dtype(at::kBool));
  if (B == 0 || N == 0) return {visible, ids_keep, mask};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // Shared memory beyond the default 48 KiB (N > 12288) must be opted into per kernel.
  const size_t smem = static_cast<size_t>(N) * sizeof(uint32_t);
  if (smem > 48 * 1024) {
    int max_smem = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                          x.device().index()));
    TORCH_CHECK_VALUE(smem <= static_cast<size_t>(max_smem), "mask_gather: N=", N,
                      " tokens per modality need ", smem, " bytes of shared memory, more than the ",
                      max_smem, " this GPU allows per block");
    C10_CUDA_CHECK(cudaFuncSetAttribute(select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  const int threads = static_cast<int>(std::min<int64_t>(1024, (N + 31) / 32 * 32));
  select_kernel<<<B * K, threads, smem, stream>>>(noise.data_ptr<float>(), num_visible.data_ptr<int64_t>(),
                                                  ids_keep.data_ptr<int64_t>(), mask.data_ptr<bool>(), K, N, V);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  copy_rows</*kScatter=*/false>(x.data_ptr(), visible.data_ptr(), ids_keep.data_ptr<int64_t>(), B * V, V, L,
                                D * x.element_size(), stream);
  return {visible, ids_keep, mask};
}

// The gradient, as on the CPU: zeros (a memset at full write bandwidth), then the V kept
// rows of each sample scattered back. Writing the kept rows twice costs V/L of the
// tensor, less than the extra kernel a token -> slot map would need to avoid it.
at::Tensor mask_gather_backward_cuda(const at::Tensor& grad_visible_in, const at::Tensor& ids_keep_in,
                                     int64_t num_tokens) {
  check_backward_args(grad_visible_in, ids_keep_in, num_tokens, at::kCUDA);
  const c10::cuda::CUDAGuard guard(grad_visible_in.device());
  const at::Tensor grad_visible = grad_visible_in.contiguous();
  const at::Tensor ids_keep = ids_keep_in.contiguous();
  const int64_t B = grad_visible.size(0), V = grad_visible.size(1), D = grad_visible.size(2);
  at::Tensor grad_x = at::zeros({B, num_tokens, D}, grad_visible.options());
  copy_rows</*kScatter=*/true>(grad_visible.data_ptr(), grad_x.data_ptr(), ids_keep.data_ptr<int64_t>(), B * V,
                               V, num_tokens, D * grad_visible.element_size(),
                               c10::cuda::getCurrentCUDAStream());
  return grad_x;
}

TORCH_LIBRARY_IMPL(maskmentor, CUDA, m) {
  m.impl("mask_gather", &mask_gather_cuda);
  m.impl("mask_gather_backward", &mask_gather_backward_cuda);
}

}  // namespace maskmentor
