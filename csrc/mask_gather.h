// csrc/mask_gather.h — what the CPU kernel (mask_gather.cpp) and the CUDA kernel
// (mask_gather_cuda.cu) of torch.ops.maskmentor.mask_gather share: the order in which
// tokens are kept, and the host-side checks of the arguments.
//
// Both kernels must agree bit for bit with masking.mask_gather_reference, which keeps,
// per sample and modality, the first num_visible[b, k] tokens of a *stable* ascending
// argsort of the noise. Writing that order down once, here, is what keeps the two
// kernels (and the reference) from drifting apart.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define MM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MM_HOST_DEVICE inline
#endif

namespace maskmentor {

// One 64-bit integer per token whose unsigned order is the order of the stable argsort:
// the high 32 bits order by noise value, the low 32 bits (the token's index within its
// modality) break ties by index. Since the keys of a modality are all distinct, "keep
// the n smallest keys" is exact and needs no tie rule of its own, and integer compares
// are cheaper than (float, index) pair compares on both CPU and GPU.
//
// The float -> uint32 map is the usual radix-sort one (flip all bits of negatives, the
// sign bit of positives), adjusted to match torch.sort's semantics exactly:
//   * -0.0 and +0.0 compare equal (so they tie, and the index decides);
//   * NaN sorts after everything, +inf included, and all NaNs tie.
MM_HOST_DEVICE uint32_t noise_order_bits(float v) {
  uint32_t u;
#ifdef __CUDA_ARCH__
  u = __float_as_uint(v);
#else
  std::memcpy(&u, &v, sizeof u);  // the portable bit cast
#endif
  if (v != v) return 0xFFFFFFFFu;  // NaN: the largest key (no finite/inf maps there)
  if (u == 0x80000000u) u = 0u;    // -0.0 -> +0.0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

MM_HOST_DEVICE uint64_t token_key(float noise, uint32_t index) {
  return (static_cast<uint64_t>(noise_order_bits(noise)) << 32) | index;
}

MM_HOST_DEVICE uint32_t key_index(uint64_t key) {
  return static_cast<uint32_t>(key & 0xFFFFFFFFu);
}

// Shapes, dtypes and devices; `device` is the backend the calling kernel serves. The
// messages match masking._check_mask_gather_args, and TORCH_CHECK_VALUE raises a Python
// ValueError like the reference does, so callers see the same error whichever backend
// runs.
inline void check_mask_gather_args(const at::Tensor& x, const at::Tensor& noise,
                                   const at::Tensor& num_visible, at::DeviceType device) {
  TORCH_CHECK_VALUE(x.dim() == 3 && at::isFloatingType(x.scalar_type()),
                    "mask_gather: x must be a float [B, K*N, D] tensor, got ", x.sizes(), " ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(noise.scalar_type() == at::kFloat && noise.dim() == 2 &&
                        noise.size(0) == x.size(0) && noise.size(1) == x.size(1),
                    "mask_gather: noise must be float32 of shape [", x.size(0), ", ", x.size(1),
                    "], got ", noise.sizes(), " ", noise.scalar_type());
  TORCH_CHECK_VALUE(num_visible.scalar_type() == at::kLong && num_visible.dim() == 2 &&
                        num_visible.size(0) == x.size(0),
                    "mask_gather: num_visible must be int64 [B, K], got ", num_visible.sizes(),
                    " ", num_visible.scalar_type());
  TORCH_CHECK_VALUE(x.device() == noise.device() && x.device() == num_visible.device(),
                    "mask_gather: x, noise and num_visible must be on the same device, got ",
                    x.device(), ", ", noise.device(), ", ", num_visible.device());
  TORCH_CHECK_VALUE(x.device().type() == device, "mask_gather: this kernel serves ", device,
                    " tensors, got ", x.device());
  const int64_t K = num_visible.size(1);
  TORCH_CHECK_VALUE(K > 0 && x.size(1) % K == 0, "mask_gather: ", x.size(1),
                    " tokens cannot be split into K=", K, " equal modalities");
  // The low half of a token_key holds the index within a modality.
  TORCH_CHECK_VALUE(x.size(1) / K <= INT32_MAX, "mask_gather: more than 2^31 tokens per modality");
}

// The values of num_visible (read from a CPU copy): every count in [0, N], every row
// the same sum. Returns that sum, V, the length of the visible sequence.
inline int64_t check_visible_counts(const at::Tensor& num_visible_cpu, int64_t N) {
  const int64_t B = num_visible_cpu.size(0), K = num_visible_cpu.size(1);
  const int64_t* nv = num_visible_cpu.data_ptr<int64_t>();
  int64_t V = 0;
  for (int64_t b = 0; b < B; ++b) {
    int64_t row_sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t n = nv[b * K + k];
      TORCH_CHECK_VALUE(0 <= n && n <= N, "mask_gather: num_visible must be in [0, N=", N,
                        "], got ", n, " at [", b, ", ", k, "]");
      row_sum += n;
    }
    if (b == 0) V = row_sum;
    TORCH_CHECK_VALUE(row_sum == V, "mask_gather: every row of num_visible must have the same "
                      "sum (the visible budget V), got ", V, " in row 0 and ", row_sum, " in row ", b);
  }
  return V;
}

// The backward's arguments: grad_visible [B, V, D] float, ids_keep [B, V] int64 on the
// same device, num_tokens = L, the length of x.
inline void check_backward_args(const at::Tensor& grad_visible, const at::Tensor& ids_keep,
                                int64_t num_tokens, at::DeviceType device) {
  TORCH_CHECK_VALUE(grad_visible.dim() == 3 && at::isFloatingType(grad_visible.scalar_type()),
                    "mask_gather_backward: grad_visible must be a float [B, V, D] tensor, got ",
                    grad_visible.sizes(), " ", grad_visible.scalar_type());
  TORCH_CHECK_VALUE(ids_keep.scalar_type() == at::kLong && ids_keep.dim() == 2 &&
                        ids_keep.size(0) == grad_visible.size(0) &&
                        ids_keep.size(1) == grad_visible.size(1),
                    "mask_gather_backward: ids_keep must be int64 [B, V] matching grad_visible, got ",
                    ids_keep.sizes(), " ", ids_keep.scalar_type());
  TORCH_CHECK_VALUE(grad_visible.device() == ids_keep.device() &&
                        grad_visible.device().type() == device,
                    "mask_gather_backward: grad_visible and ids_keep must both be ", device,
                    " tensors, got ", grad_visible.device(), ", ", ids_keep.device());
  TORCH_CHECK_VALUE(num_tokens >= grad_visible.size(1), "mask_gather_backward: num_tokens (",
                    num_tokens, ") is smaller than V (", grad_visible.size(1), ")");
}

}  // namespace maskmentor
