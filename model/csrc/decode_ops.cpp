// Fused CPU kernels for the packed (bf16/int8/int4/gguf) weight modes, where a decode step's
// matmuls are small enough that the many little elementwise kernels around them, each a dispatch
// and a pass over memory, cost as much as the matmuls do. Built on first use by
// model/native_ops.py (torch.utils.cpp_extension); the model falls back to plain torch ops when
// it cannot be built. fp32 mode never uses these: it stays the reference arithmetic.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using bf16 = c10::BFloat16;

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

#if defined(__AVX512F__)
// exp(x) for |x| < 87 (clamped beyond): 2^t = 2^round(t) · 2^f with |f| ≤ ½ and a degree-7 Taylor
// polynomial for 2^f (relative error ~1e-8). libm's expf is scalar here, and was a third of a
// decode row's attention.
inline __m512 exp512(__m512 x) {
    static const float c[8] = {1.f, 0.693147181f, 0.240226507f, 0.0555041087f, 0.00961812911f, 0.00133335581f,
                               0.000154035304f, 0.0000152527338f};     // (ln 2)^i / i!
    const __m512 t = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                                 _mm512_set1_ps(-126.f)), _mm512_set1_ps(126.f));
    const __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, whole);
    __m512 p = _mm512_set1_ps(c[7]);
    for (int i = 6; i >= 0; --i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
    return _mm512_scalef_ps(p, whole);
}

// 16 floats from float32 or bfloat16 memory, and back (bf16: round to nearest even, as c10's).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(bf16* p, __m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}
#endif

// x[j] ← exp(x[j] − shift) → Σ x[j] (the softmax's numerators).
inline float exp_shifted(float* x, int64_t n, float shift) {
    int64_t j = 0;
    float sum = 0.f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + j), _mm512_set1_ps(shift)));
        _mm512_storeu_ps(x + j, e);
        acc = _mm512_add_ps(acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; j < n; ++j) {
        x[j] = std::exp(x[j] - shift);
        sum += x[j];
    }
    return sum;
}

// y = x / sqrt(mean(x²) + eps) · w, one row at a time (float accumulation).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
    TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat, "rms_norm: float32 tensors");
    auto xc = x.contiguous();
    const int64_t d = xc.size(-1), rows = xc.numel() / d;
    TORCH_CHECK(w.numel() == d, "rms_norm: weight size ", w.numel(), " for rows of ", d);
    auto out = torch::empty_like(xc);
    const float* xp = xc.data_ptr<float>();
    const float* wp = w.contiguous().data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const float* xr = xp + r * d;
            float* yr = op + r * d;
            float ss = 0.f;
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < d; ++i) ss += xr[i] * xr[i];
            const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + static_cast<float>(eps));
            for (int64_t i = 0; i < d; ++i) yr[i] = xr[i] * inv * wp[i];
        }
    });
    return out;
}

// silu(gate) · up on [rows, 2F] = [gate | up] → [rows, F], in the input's dtype, rounded once.
template <typename T>
void silu_mul_rows(const T* in, int64_t in_stride, T* out, int64_t rows, int64_t f) {
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const T* g = in + r * in_stride;
            const T* u = g + f;
            T* y = out + r * f;
            int64_t i = 0;
#if defined(__AVX512F__)
            for (; i + 16 <= f; i += 16) {
                const __m512 gx = load16(g + i);
                const __m512 sig = _mm512_div_ps(gx, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), gx))));
                store16(y + i, _mm512_mul_ps(sig, load16(u + i)));
            }
#endif
            for (; i < f; ++i) {
                const float gv = to_float(g[i]);
                y[i] = static_cast<T>(gv / (1.f + std::exp(-gv)) * to_float(u[i]));
            }
        }
    });
}

torch::Tensor silu_mul(const torch::Tensor& gate_up, int64_t f) {
    TORCH_CHECK(gate_up.size(-1) >= 2 * f && gate_up.stride(-1) == 1, "silu_mul: [rows, ≥2F] with unit stride");
    auto g2 = gate_up.reshape({-1, gate_up.size(-1)});
    const int64_t rows = g2.size(0);
    auto sizes = gate_up.sizes().vec();
    sizes.back() = f;
    auto out = torch::empty(sizes, gate_up.options());
    if (gate_up.scalar_type() == torch::kBFloat16) {
        silu_mul_rows(g2.data_ptr<bf16>(), g2.stride(0), out.data_ptr<bf16>(), rows, f);
    } else {
        TORCH_CHECK(gate_up.scalar_type() == torch::kFloat, "silu_mul: bfloat16 or float32");
        silu_mul_rows(g2.data_ptr<float>(), g2.stride(0), out.data_ptr<float>(), rows, f);
    }
    return out;
}


// One decode token per row, the rows' keys/values held contiguously (model/kv_cache.py
// DecodeRows): RoPE on q and k, the new k/v appended to the row and stored in the paged pool,
// attention over the row's own tokens.
// - qkv [B, (H + 2·Hkv)·D], bfloat16 or float32, rows may be strided;
// - cos/sin [B, D] at each row's position (half-split layout, signed sine);
// - k_rows/v_rows: float32 buffers of [Hkv, D] slots; row r's new token goes to slot
//   row_slots[r] + row_offset, and its keys are the lengths[r] slots ending there;
// - k_pool/v_pool: this layer's float32 [slots, Hkv, D] of the paged cache, written at pool_slots.
// → (attention output [B, H, D], rotated q [B, H, D]), float32.
template <typename T>
void decode_attention_impl(const T* qkv, int64_t qkv_stride, const float* cos, const float* sin,
                           float* k_rows, float* v_rows, const int64_t* slots, const int64_t* lengths,
                           float* k_pool, float* v_pool, const int64_t* pool_slots,
                           float* out, float* q_out, int64_t b, int64_t h, int64_t hkv, int64_t d) {
    const int64_t half = d / 2, group = h / hkv;
    const float scale = 1.f / std::sqrt(static_cast<float>(d));
    // RoPE and the append, per row (cheap: one token).
    for (int64_t r = 0; r < b; ++r) {
        const T* src = qkv + r * qkv_stride;
        const float* c = cos + r * d;
        const float* s = sin + r * d;
        float* kdst = k_rows + slots[r] * hkv * d;
        float* vdst = v_rows + slots[r] * hkv * d;
        for (int64_t head = 0; head < h + hkv; ++head) {
            const T* x = src + head * d;
            float* y = head < h ? q_out + (r * h + head) * d : kdst + (head - h) * d;
            for (int64_t i = 0; i < d; ++i) {
                const float rolled = to_float(x[i < half ? i + half : i - half]);
                y[i] = to_float(x[i]) * c[i] + rolled * s[i];
            }
        }
        const T* v = src + (h + hkv) * d;
        for (int64_t i = 0; i < hkv * d; ++i) vdst[i] = to_float(v[i]);
        std::copy(kdst, kdst + hkv * d, k_pool + pool_slots[r] * hkv * d);
        std::copy(vdst, vdst + hkv * d, v_pool + pool_slots[r] * hkv * d);
    }
    // Attention, one task per row, or per part of a row when there are fewer rows than threads
    // and they are long (a batch-1 chat deep into its context): each part keeps its own softmax
    // maximum, sum and unnormalized output, merged after. A task reads each key and value
    // [Hkv, D] once, in order, for all of the row's query heads: a step finds its keys out of
    // cache (a layer's weights passed through it since), and reading one KV head at a time
    // strode through them (a batch-1 row of 150 tokens, cache cold: 76 → 23 µs).
    int64_t longest = 0;
    for (int64_t r = 0; r < b; ++r) longest = std::max(longest, lengths[r]);
    const int64_t work = longest * d * h, threads = at::get_num_threads();
    // Threads only for work long enough to repay waking them.
    const int64_t parts = b < threads ? std::clamp<int64_t>(work / 131072, 1, threads) : 1;
    const int64_t grain = parts > 1 ? 1 : std::max<int64_t>(1, 262144 / std::max<int64_t>(1, work));
    const int64_t span = (longest + parts - 1) / parts;      // keys per part at most
    std::vector<float> part_max(b * parts * h), part_sum(b * parts * h), part_out(b * parts * h * d, 0.f);
    at::parallel_for(0, b * parts, grain, [&](int64_t begin, int64_t end) {
        std::vector<float> scores(h * span);
        for (int64_t task = begin; task < end; ++task) {
            const int64_t r = task / parts, n_row = lengths[r], chunk = (n_row + parts - 1) / parts;
            const int64_t j0 = std::min(n_row, task % parts * chunk), n = std::min(n_row, j0 + chunk) - j0;
            const int64_t first = slots[r] - n_row + 1 + j0;
            const float* q = q_out + r * h * d;
            float* o = part_out.data() + task * h * d;
            if (n == 0) {       // a short row's empty part: weighs nothing in the merge
                std::fill(part_sum.begin() + task * h, part_sum.begin() + (task + 1) * h, 0.f);
                std::fill(part_max.begin() + task * h, part_max.begin() + (task + 1) * h, -INFINITY);
                continue;
            }
            for (int64_t j = 0; j < n; ++j) {
                const float* key = k_rows + (first + j) * hkv * d;
                for (int64_t qh = 0; qh < h; ++qh) {
                    const float* qq = q + qh * d;
                    const float* k = key + (qh / group) * d;
                    float dot = 0.f;
#pragma omp simd reduction(+ : dot)     // reassociated, so vectorized (a plain sum is not)
                    for (int64_t i = 0; i < d; ++i) dot += qq[i] * k[i];
                    scores[qh * n + j] = dot * scale;
                }
            }
            for (int64_t qh = 0; qh < h; ++qh) {
                float* sc = scores.data() + qh * n;
                float mx = sc[0];
                for (int64_t j = 1; j < n; ++j) mx = std::max(mx, sc[j]);
                part_max[task * h + qh] = mx;
                part_sum[task * h + qh] = exp_shifted(sc, n, mx);
            }
            for (int64_t j = 0; j < n; ++j) {
                const float* value = v_rows + (first + j) * hkv * d;
                for (int64_t qh = 0; qh < h; ++qh) {
                    const float p = scores[qh * n + j];
                    const float* v = value + (qh / group) * d;
                    float* oo = o + qh * d;
                    for (int64_t i = 0; i < d; ++i) oo[i] += p * v[i];
                }
            }
        }
    });
    for (int64_t r = 0; r < b; ++r) {
        for (int64_t qh = 0; qh < h; ++qh) {
            float mx = -INFINITY;
            for (int64_t p = 0; p < parts; ++p) mx = std::max(mx, part_max[(r * parts + p) * h + qh]);
            float total = 0.f;
            float* o = out + (r * h + qh) * d;
            std::fill(o, o + d, 0.f);
            for (int64_t p = 0; p < parts; ++p) {
                const int64_t at = (r * parts + p) * h + qh;
                if (part_sum[at] == 0.f) continue;
                const float w = std::exp(part_max[at] - mx);
                total += part_sum[at] * w;
                const float* po = part_out.data() + at * d;
                for (int64_t i = 0; i < d; ++i) o[i] += w * po[i];
            }
            const float inv = 1.f / total;
            for (int64_t i = 0; i < d; ++i) o[i] *= inv;
        }
    }
}

std::vector<torch::Tensor> decode_attention(const torch::Tensor& qkv, const torch::Tensor& cos,
                                            const torch::Tensor& sin, torch::Tensor k_rows,
                                            torch::Tensor v_rows, const torch::Tensor& row_slots,
                                            int64_t row_offset, const torch::Tensor& lengths,
                                            torch::Tensor k_pool, torch::Tensor v_pool,
                                            const torch::Tensor& pool_slots, int64_t n_heads,
                                            int64_t n_kv_heads) {
    TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "decode_attention: qkv [B, (H + 2·Hkv)·D], unit stride");
    for (const auto* t : {&k_rows, &v_rows, &k_pool, &v_pool}) {
        TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous(),
                    "decode_attention: contiguous float32 key/value slots");
    }
    const int64_t b = qkv.size(0), d = cos.size(-1), slot = n_kv_heads * d;
    TORCH_CHECK(n_heads % n_kv_heads == 0 && d % 2 == 0 && qkv.size(1) >= (n_heads + 2 * n_kv_heads) * d,
                "decode_attention: qkv narrower than its heads");
    auto cs = cos.contiguous(), sn = sin.contiguous();
    auto rs = row_slots.to(torch::kLong).contiguous();
    auto len = lengths.to(torch::kLong).contiguous(), pool = pool_slots.to(torch::kLong).contiguous();
    TORCH_CHECK(cs.numel() == b * d && sn.numel() == b * d && rs.numel() == b && len.numel() == b &&
                pool.numel() == b, "decode_attention: one cos/sin row, slot, length and pool slot per row");
    std::vector<int64_t> slots(rs.data_ptr<int64_t>(), rs.data_ptr<int64_t>() + b);
    for (auto& s : slots) s += row_offset;
    const int64_t *sp = slots.data(), *lp = len.data_ptr<int64_t>(), *pp = pool.data_ptr<int64_t>();
    const int64_t n_rows = std::min(k_rows.numel(), v_rows.numel()) / slot;
    const int64_t n_pool = std::min(k_pool.numel(), v_pool.numel()) / slot;
    for (int64_t r = 0; r < b; ++r) {
        TORCH_CHECK(lp[r] >= 1 && sp[r] < n_rows && sp[r] - lp[r] + 1 >= 0 && pp[r] >= 0 && pp[r] < n_pool,
                    "decode_attention: row ", r, " reaches outside its key/value slots");
    }
    auto f32 = qkv.options().dtype(torch::kFloat);
    auto out = torch::empty({b, n_heads, d}, f32), q = torch::empty({b, n_heads, d}, f32);
    auto run = [&](auto* p) {
        decode_attention_impl(p, qkv.stride(0), cs.data_ptr<float>(), sn.data_ptr<float>(), k_rows.data_ptr<float>(),
                              v_rows.data_ptr<float>(), sp, lp, k_pool.data_ptr<float>(), v_pool.data_ptr<float>(),
                              pp, out.data_ptr<float>(), q.data_ptr<float>(), b, n_heads, n_kv_heads, d);
    };
    if (qkv.scalar_type() == torch::kBFloat16) {
        run(qkv.data_ptr<bf16>());
    } else {
        TORCH_CHECK(qkv.scalar_type() == torch::kFloat, "decode_attention: bfloat16 or float32 qkv");
        run(qkv.data_ptr<float>());
    }
    return {out, q};
}


// LLaMA-Adapter's gated branch: gate · softmax(q·kᵀ/√D) · v over each row's adapter prompt (its
// own softmax, apart from the tokens'). q [B, H, T, D]; keys/values [B, Hkv, K, D]; gates
// [B, H, 1, 1]; key_mask [B, K] bool (true = real prompt) or undefined → [B, H, T, D], float32.
// (SDPA's CPU kernel took 183 µs for 32 decode rows over 10-token prompts, gate included; this 24.)
torch::Tensor gated_attention(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                              const torch::Tensor& gates, const c10::optional<torch::Tensor>& key_mask) {
    for (const auto* t : {&q, &keys, &values, &gates}) {
        TORCH_CHECK(t->scalar_type() == torch::kFloat && t->dim() == 4, "gated_attention: float32 [B, H, T, D] tensors");
    }
    auto qc = q.contiguous(), kc = keys.contiguous(), vc = values.contiguous(), gc = gates.contiguous();
    const int64_t b = qc.size(0), h = qc.size(1), t = qc.size(2), d = qc.size(3);
    const int64_t hkv = kc.size(1), n = kc.size(2);
    TORCH_CHECK(kc.size(0) == b && kc.size(3) == d && vc.sizes() == kc.sizes() && h % hkv == 0 &&
                gc.numel() == b * h, "gated_attention: shapes");
    torch::Tensor mask;
    if (key_mask.has_value() && key_mask->defined()) {
        mask = key_mask->to(torch::kBool).contiguous();
        TORCH_CHECK(mask.numel() == b * n, "gated_attention: key_mask [B, K]");
    }
    const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    auto out = torch::empty_like(qc);
    const float *qp = qc.data_ptr<float>(), *kp = kc.data_ptr<float>(), *vp = vc.data_ptr<float>(), *gp = gc.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const float scale = 1.f / std::sqrt(static_cast<float>(d));
    const int64_t group = h / hkv;
    at::parallel_for(0, b, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, h * t * n * d)), [&](int64_t begin, int64_t end) {
        std::vector<float> scores(n);
        for (int64_t r = begin; r < end; ++r) {
            for (int64_t head = 0; head < h; ++head) {
                const int64_t g = head / group;
                const float* kh = kp + (r * hkv + g) * n * d;
                const float* vh = vp + (r * hkv + g) * n * d;
                const float gate = gp[r * h + head];
                for (int64_t i = 0; i < t; ++i) {
                    const float* qq = qp + ((r * h + head) * t + i) * d;
                    float* o = op + ((r * h + head) * t + i) * d;
                    float mx = -INFINITY;
                    for (int64_t j = 0; j < n; ++j) {
                        if (mp != nullptr && !mp[r * n + j]) { scores[j] = -INFINITY; continue; }
                        const float* k = kh + j * d;
                        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                        for (int64_t c = 0; c < d; ++c) dot += qq[c] * k[c];
                        scores[j] = dot * scale;
                        mx = std::max(mx, scores[j]);
                    }
                    float sum = 0.f;
                    for (int64_t j = 0; j < n; ++j) {
                        scores[j] = scores[j] == -INFINITY ? 0.f : std::exp(scores[j] - mx);
                        sum += scores[j];
                    }
                    const float w = sum > 0.f ? gate / sum : 0.f;
                    std::fill(o, o + d, 0.f);
                    for (int64_t j = 0; j < n; ++j) {
                        const float p = scores[j] * w;
                        const float* v = vh + j * d;
                        for (int64_t c = 0; c < d; ++c) o[c] += p * v[c];
                    }
                }
            }
        }
    });
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("rms_norm", &rms_norm, "RMSNorm over the last dim (float32)");
    m.def("silu_mul", &silu_mul, "silu(gate) * up on [.., gate | up]");
    m.def("decode_attention", &decode_attention, "RoPE, KV append and attention for one token per row");
    m.def("gated_attention", &gated_attention, "LLaMA-Adapter's gated attention over each row's prompt",
          py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("gates"), py::arg("key_mask") = py::none());
}
