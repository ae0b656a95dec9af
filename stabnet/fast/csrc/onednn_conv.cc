// "VALID" 2-D cross-correlation of NHWC features with an HWIO filter at stride s (the FFI
// attribute "stride"), and its two gradients, computed by oneDNN; exported as XLA FFI handlers
// for XLA:CPU (stabnet/onednn.py). All three arrays of a call are float32, or all bfloat16
// (oneDNN accumulates in float32 and rounds each output once).
//
//   StabnetConvForward(x[N,H,W,Ci], w[kh,kw,Ci,Co])     -> y[N,Ho,Wo,Co], Ho = (H-kh)/s+1
//   StabnetConvBackwardData(dy[N,Ho,Wo,Co], w)          -> dx[N,H,W,Ci]
//   StabnetConvBackwardWeights(x, dy)                   -> dw[kh,kw,Ci,Co]
//
// XLA:CPU's own convolutions (Eigen; YNNPACK refuses 16-channel layers) run the CIFAR networks'
// 3x3 layers at about half the speed of oneDNN's on a 2-core AVX-512 CPU (benchmarks/RESULTS.md).
// The primitives are created once per shape and reused; calls are serialised (each one uses
// every core through oneDNN's OpenMP threads).
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

enum Pass { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One pass of one convolution shape: the primitive and, where the primitive keeps the filter
// in a blocked layout, the reorder between it and HWIO (into the blocked layout for the passes
// that read the filter, out of it for the one that writes its gradient).
struct Plan {
  memory::desc x, y, w_hwio, w_blocked;
  dnnl::primitive conv;
  bool blocked = false;
  dnnl::reorder reorder;
};

using Key = std::tuple<int, memory::data_type, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t>;
std::mutex mutex;
std::map<Key, std::unique_ptr<Plan>> plans;

Plan& GetPlan(Pass pass, memory::data_type dt, int64_t n, int64_t h, int64_t w, int64_t ci,
              int64_t kh, int64_t kw, int64_t co, int64_t s) {
  Key key{pass, dt, n, h, w, ci, kh, kw, co, s};
  auto found = plans.find(key);
  if (found != plans.end()) return *found->second;
  using tag = memory::format_tag;
  auto p = std::make_unique<Plan>();
  // oneDNN's logical dimensions are NCHW / OIHW; the tags give the memory layouts.
  p->x = memory::desc({n, ci, h, w}, dt, tag::nhwc);
  p->y = memory::desc({n, co, (h - kh) / s + 1, (w - kw) / s + 1}, dt, tag::nhwc);
  p->w_hwio = memory::desc({co, ci, kh, kw}, dt, tag::hwio);
  memory::desc w_any({co, ci, kh, kw}, dt, tag::any);
  const memory::dims stride{s, s}, no_pad{0, 0};
  const auto direct = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc fwd(Engine(), dnnl::prop_kind::forward_training,
                                                direct, p->x, w_any, p->y, stride, no_pad, no_pad);
  if (pass == kForward) {
    p->w_blocked = fwd.weights_desc();
    p->conv = dnnl::convolution_forward(fwd);
  } else if (pass == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(Engine(), direct, p->x, w_any, p->y,
                                                       stride, no_pad, no_pad, fwd);
    p->w_blocked = pd.weights_desc();
    p->conv = dnnl::convolution_backward_data(pd);
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(Engine(), direct, p->x, w_any, p->y,
                                                          stride, no_pad, no_pad, fwd);
    p->w_blocked = pd.diff_weights_desc();
    p->conv = dnnl::convolution_backward_weights(pd);
  }
  p->blocked = p->w_blocked != p->w_hwio;
  if (p->blocked) {
    const bool out = pass == kBackwardWeights;
    p->reorder = dnnl::reorder(dnnl::reorder::primitive_desc(
        Engine(), out ? p->w_blocked : p->w_hwio, Engine(), out ? p->w_hwio : p->w_blocked));
  }
  Plan& plan = *p;
  plans.emplace(key, std::move(p));
  return plan;
}

// x: [N,H,W,Ci] (dx for kBackwardData), w: HWIO (dw for kBackwardWeights), y: [N,Ho,Wo,Co]
// (dy for both backward passes).
ffi::Error Run(Pass pass, const ffi::AnyBuffer& x, const ffi::AnyBuffer& w,
               const ffi::AnyBuffer& y, int64_t s) {
  auto x_dims = x.dimensions(), w_dims = w.dimensions(), y_dims = y.dimensions();
  if (x_dims.size() != 4 || w_dims.size() != 4 || y_dims.size() != 4 || s < 1 ||
      x_dims[3] != w_dims[2] || x_dims[1] < w_dims[0] || x_dims[2] < w_dims[1] ||
      y_dims[0] != x_dims[0] || y_dims[1] != (x_dims[1] - w_dims[0]) / s + 1 ||
      y_dims[2] != (x_dims[2] - w_dims[1]) / s + 1 || y_dims[3] != w_dims[3]) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "stabnet oneDNN convolution: expected x [N,H,W,Ci], w [kh,kw,Ci,Co] with "
                      "kh <= H, kw <= W, and y [N,(H-kh)/s+1,(W-kw)/s+1,Co], stride s >= 1");
  }
  const ffi::DataType type = x.element_type();
  if (w.element_type() != type || y.element_type() != type ||
      (type != ffi::DataType::F32 && type != ffi::DataType::BF16)) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "stabnet oneDNN convolution: x, w and y must all be float32 or all "
                      "bfloat16");
  }
  const auto dt = type == ffi::DataType::F32 ? memory::data_type::f32 : memory::data_type::bf16;
  std::lock_guard<std::mutex> lock(mutex);
  try {
    Plan& p = GetPlan(pass, dt, x_dims[0], x_dims[1], x_dims[2], x_dims[3], w_dims[0],
                      w_dims[1], w_dims[3], s);
    dnnl::stream stream(Engine());
    memory xm(p.x, Engine(), x.untyped_data()), ym(p.y, Engine(), y.untyped_data());
    memory w_user(p.w_hwio, Engine(), w.untyped_data());
    memory wm = p.blocked ? memory(p.w_blocked, Engine()) : w_user;
    if (p.blocked && pass != kBackwardWeights) p.reorder.execute(stream, w_user, wm);
    if (pass == kForward) {
      p.conv.execute(stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, ym}});
    } else if (pass == kBackwardData) {
      p.conv.execute(stream,
                     {{DNNL_ARG_DIFF_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DIFF_DST, ym}});
    } else {
      p.conv.execute(stream,
                     {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_WEIGHTS, wm}, {DNNL_ARG_DIFF_DST, ym}});
      if (p.blocked) p.reorder.execute(stream, wm, w_user);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
  return ffi::Error::Success();
}

using Out = ffi::Result<ffi::AnyBuffer>;

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer w, Out y, int64_t stride) {
  return Run(kForward, x, w, *y, stride);
}

ffi::Error BackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w, Out dx, int64_t stride) {
  return Run(kBackwardData, *dx, w, dy, stride);
}

ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, Out dw, int64_t stride) {
  return Run(kBackwardWeights, x, *dw, dy, stride);
}

}  // namespace

// Whether this CPU runs oneDNN's bfloat16 convolutions (AVX-512 at least; natively with
// AVX512-BF16 or AMX): creating a small primitive descriptor fails where it does not.
extern "C" int StabnetBf16Supported() {
  try {
    std::lock_guard<std::mutex> lock(mutex);
    GetPlan(kBackwardWeights, memory::data_type::bf16, 1, 4, 4, 16, 3, 3, 16, 1);
    return 1;
  } catch (const dnnl::error&) {
    return 0;
  }
}

#define STABNET_BINARY_HANDLER(name, impl)                                        \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl,                                       \
                                ffi::Ffi::Bind()                                  \
                                    .Arg<ffi::AnyBuffer>()                        \
                                    .Arg<ffi::AnyBuffer>()                        \
                                    .Ret<ffi::AnyBuffer>()                        \
                                    .Attr<int64_t>("stride"));

STABNET_BINARY_HANDLER(StabnetConvForward, Forward)
STABNET_BINARY_HANDLER(StabnetConvBackwardData, BackwardData)
STABNET_BINARY_HANDLER(StabnetConvBackwardWeights, BackwardWeights)
