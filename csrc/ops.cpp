// Every schema of the cogvx op library, declared once. Implementations register per dispatch key
// from csrc/cpu/<op>.cpp and csrc/cuda/<op>.cpp (rope3d: .cu); fake (meta) kernels and autograd are
// registered in Python (cogvx_kernels/ops/).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(cogvx, m) {
  // y = causal 3D convolution of x, time-padded in front by `halo` (kt-1 frames) or, without a
  // halo, by the first frame of x repeated; zero spatial padding (pad_h, pad_w); stride 1.
  m.def("causal_conv3d(Tensor x, Tensor weight, Tensor? bias, Tensor? halo, int pad_h, int pad_w) -> Tensor");
  // Returns (grad_x, grad_weight, grad_bias, grad_halo); grad_bias is empty when has_bias is
  // false and grad_halo is empty when halo is None.
  m.def(
      "causal_conv3d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? halo, int pad_h, "
      "int pad_w, bool has_bias) -> (Tensor, Tensor, Tensor, Tensor)");

  // 3D RoPE of x (B, heads, text_len + T·H·W, D), any strides: video tokens rotated pairwise by the
  // angles of `tables` (2, T+H+W, D/2) fp32 (cos, sin; see csrc/common/rope3d.h); text tokens
  // copied. `inverse` rotates by minus the angle (the backward). The `_` variant writes into x.
  m.def("rope3d(Tensor x, Tensor tables, int text_len, int grid_t, int grid_h, int grid_w, int[] axes_dim, bool inverse) -> Tensor");
  m.def("rope3d_(Tensor(a!) x, Tensor tables, int text_len, int grid_t, int grid_h, int grid_w, int[] axes_dim, bool inverse) -> ()");
  // LayerNorm over D of every (b, head, token) row of x (weight/bias (D,) or None), then 3D RoPE of
  // the video tokens, in fp32, one pass. Returns (out, mean, rstd); mean/rstd fp32 of shape x.shape[:-1].
  m.def(
      "qk_norm_rope3d(Tensor x, Tensor? weight, Tensor? bias, Tensor tables, int text_len, int grid_t, "
      "int grid_h, int grid_w, int[] axes_dim, float eps) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_weight, grad_bias): grad_weight/grad_bias in fp32 (D,), empty (0,) when
  // the corresponding parameter is absent.
  m.def(
      "qk_norm_rope3d_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, "
      "Tensor tables, int text_len, int grid_t, int grid_h, int grid_w, int[] axes_dim, bool has_weight, "
      "bool has_bias) -> (Tensor, Tensor, Tensor)");

  // Non-causal attention softmax(q·kᵀ·scale)·v of q (B, heads, Lq, D) against k, v (B, heads, Lk, D),
  // any strides with a unit last-dim stride. Returns (out, lse): out (B, heads, Lq, D) in q's dtype,
  // laid out as (B, Lq, heads, D) in memory (the layout the output projection reads), and the
  // natural-log log-sum-exp of every row, fp32 (B, heads, Lq) contiguous. See csrc/common/attention.h.
  m.def("joint_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  // Returns (grad_q, grad_k, grad_v), each laid out as (B, L, heads, D) in memory like `out`.
  // grad_lse (B, heads, Lq) fp32 or None: the gradient reaching the lse output. `deterministic`
  // asks for bit-identical results run to run (no floating-point atomics).
  m.def(
      "joint_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? grad_lse, float scale, bool deterministic) -> (Tensor, Tensor, Tensor)");
}

#ifdef COGVX_WITH_CUDA
#include "cuda/joint_attention.h"  // smem_bytes
#endif
// setup.py passes the arch list as bare tokens (-DCOGVX_CUDA_ARCHS=8.0,9.0+PTX: no quotes or
// semicolons to survive the build's shell); stringified here.
#define COGVX_STRINGIFY_(...) #__VA_ARGS__
#define COGVX_STRINGIFY(...) COGVX_STRINGIFY_(__VA_ARGS__)
#ifdef COGVX_CUDA_ARCHS
#define COGVX_CUDA_ARCH_LIST COGVX_STRINGIFY(COGVX_CUDA_ARCHS)
#else
#define COGVX_CUDA_ARCH_LIST ""
#endif

// Lets `import cogvx_kernels._C` load the library (the ops register through static initialisers).
// Module attributes describe the build, for backend choice (cogvx_kernels/_extension.py):
//   cuda_arch_list  the TORCH_CUDA_ARCH_LIST entries the CUDA kernels were compiled for, comma-
//                   separated ("" without CUDA), e.g. "8.0,9.0+PTX": cubins for sm_80 and sm_90,
//                   PTX for compute_90;
//   cuda_smem       {op: {head_dim: {kernel: dynamic shared-memory bytes per block}}} of the
//                   CUDA kernels that opt in to more than 48 KiB ({} without CUDA).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "cogvx C++/CUDA ops", -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddStringConstant(m, "cuda_arch_list", COGVX_CUDA_ARCH_LIST) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
#ifdef COGVX_WITH_CUDA
  int d64[3], d128[3];
  cogvx::attention::gpu::smem_bytes(64, d64);
  cogvx::attention::gpu::smem_bytes(128, d128);
  PyObject* smem = Py_BuildValue("{s:{i:{s:i,s:i,s:i},i:{s:i,s:i,s:i}}}", "joint_attention",
                                 64, "forward", d64[0], "backward dK/dV", d64[1], "backward dQ", d64[2],
                                 128, "forward", d128[0], "backward dK/dV", d128[1], "backward dQ", d128[2]);
#else
  PyObject* smem = PyDict_New();
#endif
  if (smem == nullptr || PyModule_AddObject(m, "cuda_smem", smem) < 0) {
    Py_XDECREF(smem);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
