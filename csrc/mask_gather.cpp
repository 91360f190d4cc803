// csrc/mask_gather.cpp — the fused masking-and-gather op: its definition (schema), its
// CPU kernels and the Python module. setup.py builds one module, `maskmentor_C`, from this
// file alone, or from this file and mask_gather_cuda.cu (the CUDA kernels) when a CUDA
// toolkit and a CUDA build of torch are there. Importing it (ops.py does) runs the
// TORCH_LIBRARY blocks, which register
//
//   torch.ops.maskmentor.mask_gather(x, noise, num_visible) -> (visible, ids_keep, mask)
//   torch.ops.maskmentor.mask_gather_backward(grad_visible, ids_keep, num_tokens) -> grad_x
//
// and their autograd formulas (below; the fake, shape-only implementations that
// torch.compile traces with are registered in Python, in ops.py).
//
// What the op computes is defined by masking.mask_gather_reference (MAE's argsort +
// gather, per modality). The reference sorts all K*N noise values and then launches a
// gather, a scatter (for the mask) and, in the backward, a scatter-add of single
// elements. Here each (sample, modality) is one task that selects its n smallest keys
// (a partial selection, O(N + n log n)), writes its slice of ids_keep and mask, and
// copies the n kept rows with memcpy; the backward writes each row of grad_x once, a
// kept row or zeros.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>  // _mm_stream_si128: in every x86-64 CPU
#endif

#include "mask_gather.h"

// Importing `maskmentor_C` from Python loads this shared library, which runs the static
// initialisers of the TORCH_LIBRARY blocks (here and, in a CUDA build, in
// mask_gather_cuda.cu). The module holds one constant, `cuda`: whether the CUDA kernels
// were built in. (A plain CPython init function instead of pybind11 keeps the build small
// and fast, and within Python's limited API.)
#ifndef MASKMENTOR_WITH_CUDA
#define MASKMENTOR_WITH_CUDA 0
#endif

extern "C" PyObject* PyInit_maskmentor_C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "maskmentor_C",                                                 // name
      "Registers torch.ops.maskmentor (schemas, CPU and CUDA kernels)",  // docstring
      -1,                                                             // no per-interpreter state
      nullptr,                                                        // no methods
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddIntConstant(module, "cuda", MASKMENTOR_WITH_CUDA) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

namespace maskmentor {

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_gather_cpu(const at::Tensor& x_in,
                                                               const at::Tensor& noise_in,
                                                               const at::Tensor& num_visible_in) {
  check_mask_gather_args(x_in, noise_in, num_visible_in, at::kCPU);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor noise = noise_in.contiguous();
  const at::Tensor num_visible = num_visible_in.contiguous();
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  const int64_t K = num_visible.size(1), N = L / K;
  const int64_t V = check_visible_counts(num_visible, N);

  at::Tensor visible = at::empty({B, V, D}, x.options());
  at::Tensor ids_keep = at::empty({B, V}, x.options().dtype(at::kLong));
  at::Tensor mask = at::empty({B, L}, x.options().dtype(at::kBool));

  // The gather moves whole rows of D elements, so it works on bytes: one memcpy per row
  // serves every dtype (fp32, bf16, fp16, ...) without a dtype dispatch.
  const int64_t row_bytes = D * x.element_size();
  const char* x_ptr = static_cast<const char*>(x.data_ptr());
  char* vis_ptr = static_cast<char*>(visible.data_ptr());
  const float* noise_ptr = noise.data_ptr<float>();
  const int64_t* nv_ptr = num_visible.data_ptr<int64_t>();
  int64_t* ids_ptr = ids_keep.data_ptr<int64_t>();
  bool* mask_ptr = mask.data_ptr<bool>();

  // One task per (sample, modality); a chunk of tasks should be worth at least torch's
  // usual grain (~32k elements touched) before it is handed to another thread.
  const int64_t work_per_task = N + (V / K + 1) * D;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work_per_task));

  at::parallel_for(0, B * K, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keys(N);  // scratch, reused by every task of this chunk
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / K, k = task % K;
      const int64_t n = nv_ptr[b * K + k];
      int64_t offset = 0;  // where this modality's tokens start in the visible sequence
      for (int64_t j = 0; j < k; ++j) offset += nv_ptr[b * K + j];

      bool* mask_row = mask_ptr + b * L + k * N;
      std::fill(mask_row, mask_row + N, true);
      if (n == 0) continue;

      // Select the n smallest keys, then order just those: nth_element partitions in
      // O(N), and only the n kept keys pay for a sort.
      const float* noise_row = noise_ptr + b * L + k * N;
      for (int64_t i = 0; i < N; ++i) keys[i] = token_key(noise_row[i], static_cast<uint32_t>(i));
      if (n < N) std::nth_element(keys.begin(), keys.begin() + n, keys.end());
      std::sort(keys.begin(), keys.begin() + n);

      int64_t* ids_row = ids_ptr + b * V + offset;
      char* dst = vis_ptr + (b * V + offset) * row_bytes;
      const char* src = x_ptr + (b * L + k * N) * row_bytes;
      for (int64_t r = 0; r < n; ++r) {
        const int64_t i = key_index(keys[r]);
        ids_row[r] = k * N + i;
        mask_row[i] = false;
        std::memcpy(dst + r * row_bytes, src + i * row_bytes, row_bytes);
      }
    }
  });
  return {visible, ids_keep, mask};
}

// Streaming (non-temporal) stores: they write whole cache lines straight to memory,
// without first reading each line into the cache (a "read for ownership"), which is what
// an ordinary store to a line that is not cached costs. grad_x is write-only here and
// usually lands in memory no cache holds (a block last used by other work). At ViT-B
// shapes (21.7 MB), timed right after the reference as in bench.py's side-by-side timing,
// the backward took 0.5-0.7 ms with them and 0.5-1.2 ms with memset/memcpy, depending on
// the block it got (up to 1.7x faster, never slower). When the same block was just written
// and is still cached (the op timed alone, in a loop) they are ~10% slower; small outputs
// stay cached for the next op, so they keep ordinary stores. x86-64 only (SSE2); other
// CPUs use memcpy/memset.
constexpr int64_t kStreamingMinBytes = int64_t{8} << 20;  // grad_x of at least 8 MiB

// dst is 64-byte aligned and n a multiple of 64 (checked by the caller): whole lines.
// Without SSE2 `streaming` is never true and these are never called.
inline void stream_copy(char* dst, const char* src, int64_t n) {
#if defined(__SSE2__)
  for (int64_t i = 0; i < n; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
  }
#else
  std::memcpy(dst, src, n);
#endif
}

inline void stream_zero(char* dst, int64_t n) {
#if defined(__SSE2__)
  const __m128i zero = _mm_setzero_si128();
  for (int64_t i = 0; i < n; i += 64) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), zero);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), zero);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), zero);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), zero);
  }
#else
  std::memset(dst, 0, n);
#endif
}

// Streaming stores are weakly ordered: each thread fences its own before the pool's
// barrier hands grad_x to the caller.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

#if defined(__SSE2__)
constexpr bool kHaveStreamingStores = true;
#else
constexpr bool kHaveStreamingStores = false;
#endif

// The gradient of the gather: grad_x[b, ids_keep[b, v]] = grad_visible[b, v], zero at
// every hidden token. The positions in a row of ids_keep are distinct (the forward made
// them), so this is a plain row copy, not an accumulation — unlike the reference's
// gather, whose backward is an element-wise scatter-add into a zeroed tensor.
//
// One pass over the B*L rows of an uninitialised grad_x: first an inverse index (which
// visible row, if any, lands at each of the B*L positions: B*V integers, negligible),
// then each row of grad_x is written exactly once, with its kept row or with zeros, and
// consecutive hidden rows are zeroed by a single memset. Every byte of grad_x is written
// once (the earlier version zeroed all of it with at::zeros, then wrote the kept rows a
// second time), the writes run front to back, and first-touch page faults of a fresh
// block happen in the parallel pass; a large grad_x is written with streaming stores
// (above). The backward is then bound by writing grad_x once (21.7 MB at ViT-B shapes,
// ~0.5 ms on the 2-core CI machine: what at::zeros alone costs). Forward + backward at
// ViT-B, fp32, idle machine, `python bench.py`: 2.4-3.2x the reference side by side over
// six runs, 3.0-4.4x with each timed alone (csrc/README.md). Streaming stores were slower
// (1.3x) in an earlier test that timed the op alone, where the block stays cached.
at::Tensor mask_gather_backward_cpu(const at::Tensor& grad_visible_in, const at::Tensor& ids_keep_in,
                                    int64_t num_tokens) {
  check_backward_args(grad_visible_in, ids_keep_in, num_tokens, at::kCPU);
  const at::Tensor grad_visible = grad_visible_in.contiguous();
  const at::Tensor ids_keep = ids_keep_in.contiguous();
  const int64_t B = grad_visible.size(0), V = grad_visible.size(1), D = grad_visible.size(2);
  const int64_t L = num_tokens;
  const int64_t row_bytes = D * grad_visible.element_size();
  const char* g_ptr = static_cast<const char*>(grad_visible.data_ptr());
  const int64_t* ids_ptr = ids_keep.data_ptr<int64_t>();

  // source[b * L + i]: the row of grad_visible (as b * V + v) kept at position i, or -1.
  std::vector<int64_t> source(B * L, -1);
  for (int64_t row = 0; row < B * V; ++row) {
    const int64_t b = row / V, i = ids_ptr[row];
    TORCH_CHECK_VALUE(0 <= i && i < L, "mask_gather_backward: ids_keep value ", i,
                      " out of range [0, ", L, ")");
    source[b * L + i] = row;
  }

  at::Tensor grad_x = at::empty({B, L, D}, grad_visible.options());
  char* gx_ptr = static_cast<char*>(grad_x.data_ptr());
  const bool streaming = kHaveStreamingStores && B * L * row_bytes >= kStreamingMinBytes &&
                         row_bytes % 64 == 0 && reinterpret_cast<uintptr_t>(gx_ptr) % 64 == 0;
  // One task per row of grad_x; a chunk is worth ~32k elements.
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, D));
  at::parallel_for(0, B * L, grain, [&](int64_t begin, int64_t end) {
    int64_t row = begin;
    while (row < end) {
      char* dst = gx_ptr + row * row_bytes;
      if (source[row] >= 0) {
        const char* src = g_ptr + source[row] * row_bytes;
        if (streaming) {
          stream_copy(dst, src, row_bytes);
        } else {
          std::memcpy(dst, src, row_bytes);
        }
        ++row;
      } else {  // a run of hidden rows: one fill
        int64_t stop = row + 1;
        while (stop < end && source[stop] < 0) ++stop;
        if (streaming) {
          stream_zero(dst, (stop - row) * row_bytes);
        } else {
          std::memset(dst, 0, (stop - row) * row_bytes);
        }
        row = stop;
      }
    }
    if (streaming) stream_fence();
  });
  return grad_x;
}

// ---------------------------------------------------------------------------------------
// Autograd. The formulas are the ones a Python torch.library.register_autograd would hold,
// written in C++ and registered at the Autograd dispatch key (so they serve the CPU and
// the CUDA kernels alike). Why not Python: at ViT-B shapes the op's forward + backward
// takes ~1 ms on CPU, and the Python autograd wrapper added ~0.1 ms of it (measured:
// forward + backward through autograd 0.97-0.98 ms with the Python wrapper, 0.86 ms with
// these, 0.74-0.77 ms for the two kernels called directly). Both functions call the ops through the dispatcher, never the
// kernels, so that torch.compile's tracer (AOTAutograd) sees `mask_gather_backward` in
// the backward graph and the fake implementations stand in for the kernels there.

// mask_gather copies x[b, ids_keep[b, v]] to visible[b, v]; its gradient puts grad_visible
// back at those rows of a zero tensor (mask_gather_backward). No gradient flows to noise
// or num_visible: the selection is piecewise constant in the noise, and ids_keep and mask
// are integer and boolean outputs.
// The ops' dispatcher handles, looked up once.
const auto& mask_gather_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("maskmentor::mask_gather", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op;
}

const auto& mask_gather_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("maskmentor::mask_gather_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt)>();
  return op;
}

class MaskGatherFunction : public torch::autograd::Function<MaskGatherFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& x, const at::Tensor& noise,
                                                const at::Tensor& num_visible) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [visible, ids_keep, mask] = mask_gather_op().call(x, noise, num_visible);
    ctx->save_for_backward({ids_keep});
    ctx->saved_data["num_tokens"] = x.sym_size(1);
    ctx->mark_non_differentiable({ids_keep, mask});
    return {visible, ids_keep, mask};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor ids_keep = ctx->get_saved_variables()[0];
    const c10::SymInt num_tokens = ctx->saved_data["num_tokens"].toSymInt();
    return {mask_gather_backward_op().call(grads[0], ids_keep, num_tokens), at::Tensor(), at::Tensor()};
  }
};

// mask_gather_backward is linear in grad_visible, and its own gradient is the gather again
// (rows ids_keep of grad_grad_x): this is what makes double backward through the op work.
class MaskGatherBackwardFunction : public torch::autograd::Function<MaskGatherBackwardFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& grad_visible,
                            const at::Tensor& ids_keep, c10::SymInt num_tokens) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({ids_keep});
    return mask_gather_backward_op().call(grad_visible, ids_keep, std::move(num_tokens));
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor ids_keep = ctx->get_saved_variables()[0];
    const at::Tensor& grad_grad_x = grads[0];
    const at::Tensor index = ids_keep.unsqueeze(-1).expand_symint(
        {ids_keep.sym_size(0), ids_keep.sym_size(1), grad_grad_x.sym_size(2)});
    return {at::gather(grad_grad_x, 1, index), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_gather_autograd(const at::Tensor& x,
                                                                    const at::Tensor& noise,
                                                                    const at::Tensor& num_visible) {
  auto out = MaskGatherFunction::apply(x, noise, num_visible);
  return {out[0], out[1], out[2]};
}

at::Tensor mask_gather_backward_autograd(const at::Tensor& grad_visible, const at::Tensor& ids_keep,
                                         c10::SymInt num_tokens) {
  return MaskGatherBackwardFunction::apply(grad_visible, ids_keep, std::move(num_tokens));
}

// The schemas. `SymInt num_tokens` (not `int`) lets torch.compile pass a symbolic
// length; the kernels receive a concrete int64_t.
TORCH_LIBRARY(maskmentor, m) {
  m.def("mask_gather(Tensor x, Tensor noise, Tensor num_visible) -> (Tensor visible, Tensor ids_keep, Tensor mask)");
  m.def("mask_gather_backward(Tensor grad_visible, Tensor ids_keep, SymInt num_tokens) -> Tensor");
}

TORCH_LIBRARY_IMPL(maskmentor, CPU, m) {
  m.impl("mask_gather", &mask_gather_cpu);
  m.impl("mask_gather_backward", &mask_gather_backward_cpu);
}

TORCH_LIBRARY_IMPL(maskmentor, Autograd, m) {
  m.impl("mask_gather", &mask_gather_autograd);
  m.impl("mask_gather_backward", &mask_gather_backward_autograd);
}

}  // namespace maskmentor
