// Check program of deep_gemm/epilogue/moe_l2_input.cuh (built and run by tests/test_l2_input_host.py).
//
// Plain C++ (g++ -std=c++17): the header's host path, i.e. the software E4M3 rounding and the shared
// integer / float32 arithmetic.  Built by nvcc as CUDA (-x cu -DDG_L2_INPUT_DEVICE, sm_89 or newer)
// it also runs the device path (the hardware cvt.rn.satfinite.e4m3x2.f32) on a GPU.
//
// Files are raw little-endian arrays; the driver compares them with deep_gemm.reference_recipes.
//   e4m3 IN OUT                 IN float32[n] -> OUT uint8[n]: e4m3_rn_satfinite
//   e2m1 IN OUT                 IN float32[n] -> OUT uint8[n]: e2m1_rn_satfinite
//   fp8 K IN OUT                IN float32[R, K] (K % 32 == 0) -> OUT: float32 scale[R, K / 32],
//                               uint8 code[R, K], float32 value[R, K] (= code x scale), uint16
//                               bf16[R, K] (RNE of value; exact: the driver checks value's low bits)
//   fp8-fault K IN OUT          the same with a deliberate fault (E' from >= instead of > 1.75's mantissa)
//   nvfp4 K IN GS OUT           IN float32[R, K] (K % 16 == 0), GS float32[R] global scales -> OUT:
//                               uint8 sf8[R, K / 16], uint8 code[R, K]
//   device-fp8 K IN OUT         (device build) "fp8" computed by a kernel
//   device-e4m3-exhaustive      (device build) every float32 bit pattern, hardware cvt vs software:
//                               prints "summary checked=N mismatches=M nan_codes_differ=X"
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <deep_gemm/epilogue/moe_l2_input.cuh>

namespace l2 = deep_gemm::l2_input;

namespace {

template <class T>
std::vector<T> read_file(const char* path) {
    std::FILE* f = std::fopen(path, "rb");
    if (!f) { std::fprintf(stderr, "cannot open %s\n", path); std::exit(2); }
    std::fseek(f, 0, SEEK_END);
    const long bytes = std::ftell(f);
    std::fseek(f, 0, SEEK_SET);
    std::vector<T> v(static_cast<size_t>(bytes) / sizeof(T));
    if (!v.empty() && std::fread(v.data(), sizeof(T), v.size(), f) != v.size()) { std::fprintf(stderr, "short read\n"); std::exit(2); }
    std::fclose(f);
    return v;
}

struct Out {
    std::FILE* f;
    explicit Out(const char* path) : f(std::fopen(path, "wb")) {
        if (!f) { std::fprintf(stderr, "cannot write %s\n", path); std::exit(2); }
    }
    ~Out() { std::fclose(f); }
    template <class T> void put(const std::vector<T>& v) { std::fwrite(v.data(), sizeof(T), v.size(), f); }
};

// float32 -> BF16 bits, RNE (test-side only: the kernels use __float2bfloat16_rn).
uint16_t bf16_rn(float x) {
    const uint32_t u = l2::float_bits(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
    return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// The fault: a block whose amax has exactly 1.75's mantissa gets twice the scale.
int fp8_pow2_sf_biased_fault(float amax) {
    const uint32_t u = l2::float_bits(amax) & 0x7FFFFFFFu;
    int e = static_cast<int>(u >> 23) + ((u & 0x7FFFFFu) >= l2::kMantissa175 ? 1 : 0);
    return (e > 113 ? e : 113) - 8;
}

struct Fp8Result {
    std::vector<float> scale, value;
    std::vector<uint8_t> code;
    std::vector<uint16_t> bf16;
};

void fp8_rows(const std::vector<float>& a, size_t k, bool fault, Fp8Result& r) {
    const size_t n = a.size(), blocks = n / 32;
    r.scale.resize(blocks), r.value.resize(n), r.code.resize(n), r.bf16.resize(n);
    for (size_t b = 0; b < blocks; ++b) {
        float amax = 0.0f;
        for (size_t i = 0; i < 32; ++i) {
            const float m = a[32 * b + i] < 0.0f ? -a[32 * b + i] : a[32 * b + i];
            amax = m > amax ? m : amax;
        }
        l2::Fp8Pow2Block blk = l2::fp8_pow2_block(amax);
        if (fault) {
            const int s = fp8_pow2_sf_biased_fault(amax);
            blk.scale = l2::bits_float(static_cast<uint32_t>(s) << 23);
            blk.inv_scale = l2::bits_float(static_cast<uint32_t>(254 - s) << 23);
        }
        r.scale[b] = blk.scale;
        for (size_t i = 32 * b; i < 32 * b + 32; ++i) {
            r.code[i] = l2::fp8_pow2_code(a[i], blk);
            r.value[i] = l2::fp8_pow2_value(a[i], blk);
            r.bf16[i] = bf16_rn(r.value[i]);
        }
    }
    (void)k;
}

void write_fp8(const char* path, const Fp8Result& r) {
    Out o(path);
    o.put(r.scale), o.put(r.code), o.put(r.value), o.put(r.bf16);
}

#if defined(DG_L2_INPUT_DEVICE)
#define CUDA_CHECK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
    std::fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_)); std::exit(3); } } while (0)

// One thread per 32-element block (the kernels reduce the amax with shuffles; max is exact in any order).
__global__ void fp8_kernel(const float* a, size_t blocks, float* scale, uint8_t* code, float* value) {
    const size_t b = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
    if (b >= blocks) return;
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = fmaxf(amax, fabsf(a[32 * b + i]));
    const l2::Fp8Pow2Block blk = l2::fp8_pow2_block(amax);
    scale[b] = blk.scale;
    for (size_t i = 32 * b; i < 32 * b + 32; ++i) {
        code[i] = l2::fp8_pow2_code(a[i], blk);
        value[i] = l2::fp8_pow2_value(a[i], blk);
    }
}

__global__ void e4m3_exhaustive_kernel(unsigned long long* counts) {
    unsigned long long mismatches = 0, nan_differ = 0;
    const uint64_t stride = uint64_t(gridDim.x) * blockDim.x;
    for (uint64_t u = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; u < (1ull << 32); u += stride) {
        const float x = __uint_as_float(static_cast<uint32_t>(u));
        const uint8_t hw = l2::e4m3_rn_satfinite(x), sw = l2::e4m3_rn_satfinite_soft(x);
        if (hw != sw) {
            if ((hw & 0x7F) == 0x7F && (sw & 0x7F) == 0x7F) ++nan_differ;     // both NaN, other sign bit
            else ++mismatches;
        }
    }
    atomicAdd(counts, mismatches);
    atomicAdd(counts + 1, nan_differ);
}

void device_fp8(const std::vector<float>& a, Fp8Result& r) {
    const size_t n = a.size(), blocks = n / 32;
    float *d_a, *d_scale, *d_value;
    uint8_t* d_code;
    CUDA_CHECK(cudaMalloc(&d_a, n * 4));
    CUDA_CHECK(cudaMalloc(&d_scale, blocks * 4 + 4));
    CUDA_CHECK(cudaMalloc(&d_value, n * 4));
    CUDA_CHECK(cudaMalloc(&d_code, n + 1));
    CUDA_CHECK(cudaMemcpy(d_a, a.data(), n * 4, cudaMemcpyHostToDevice));
    fp8_kernel<<<unsigned((blocks + 127) / 128), 128>>>(d_a, blocks, d_scale, d_code, d_value);
    CUDA_CHECK(cudaGetLastError());
    r.scale.resize(blocks), r.value.resize(n), r.code.resize(n), r.bf16.resize(n);
    CUDA_CHECK(cudaMemcpy(r.scale.data(), d_scale, blocks * 4, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(r.value.data(), d_value, n * 4, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(r.code.data(), d_code, n, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; ++i) r.bf16[i] = bf16_rn(r.value[i]);
    cudaFree(d_a), cudaFree(d_scale), cudaFree(d_value), cudaFree(d_code);
}

void device_e4m3_exhaustive() {
    unsigned long long* d;
    CUDA_CHECK(cudaMalloc(&d, 16));
    CUDA_CHECK(cudaMemset(d, 0, 16));
    e4m3_exhaustive_kernel<<<4096, 256>>>(d);
    CUDA_CHECK(cudaGetLastError());
    unsigned long long h[2];
    CUDA_CHECK(cudaMemcpy(h, d, 16, cudaMemcpyDeviceToHost));
    std::printf("summary checked=%llu mismatches=%llu nan_codes_differ=%llu\n", 1ull << 32, h[0], h[1]);
    cudaFree(d);
}
#endif

int usage() {
    std::fprintf(stderr, "usage: moe_l2_input_host e4m3|e2m1 IN OUT | fp8|fp8-fault K IN OUT | nvfp4 K IN GS OUT"
#if defined(DG_L2_INPUT_DEVICE)
                         " | device-fp8 K IN OUT | device-e4m3-exhaustive"
#endif
                         "\n");
    return 1;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) return usage();
    const std::string mode = argv[1];
    if ((mode == "e4m3" || mode == "e2m1") && argc == 4) {
        const auto x = read_file<float>(argv[2]);
        std::vector<uint8_t> c(x.size());
        for (size_t i = 0; i < x.size(); ++i) c[i] = mode == "e4m3" ? l2::e4m3_rn_satfinite(x[i]) : l2::e2m1_rn_satfinite(x[i]);
        Out(argv[3]).put(c);
        return 0;
    }
    if ((mode == "fp8" || mode == "fp8-fault") && argc == 5) {
        const size_t k = std::strtoul(argv[2], nullptr, 10);
        const auto a = read_file<float>(argv[3]);
        if (k == 0 || k % 32 || a.size() % k) return usage();
        Fp8Result r;
        fp8_rows(a, k, mode == "fp8-fault", r);
        write_fp8(argv[4], r);
        return 0;
    }
    if (mode == "nvfp4" && argc == 6) {
        const size_t k = std::strtoul(argv[2], nullptr, 10);
        const auto a = read_file<float>(argv[3]);
        const auto gs = read_file<float>(argv[4]);
        if (k == 0 || k % 16 || a.size() % k || gs.size() != a.size() / k) return usage();
        std::vector<uint8_t> sf8(a.size() / 16), code(a.size());
        for (size_t b = 0; b < a.size() / 16; ++b) {
            const float inv_g = 1.0f / gs[b * 16 / k];
            float amax = 0.0f;
            for (size_t i = 16 * b; i < 16 * b + 16; ++i) {
                const float m = a[i] < 0.0f ? -a[i] : a[i];
                amax = m > amax ? m : amax;
            }
            const l2::Nvfp4Block blk = l2::nvfp4_block(amax, inv_g);
            sf8[b] = blk.sf8;
            for (size_t i = 16 * b; i < 16 * b + 16; ++i) code[i] = l2::nvfp4_code(a[i], blk);
        }
        Out o(argv[5]);
        o.put(sf8), o.put(code);
        return 0;
    }
#if defined(DG_L2_INPUT_DEVICE)
    if (mode == "device-fp8" && argc == 5) {
        const size_t k = std::strtoul(argv[2], nullptr, 10);
        const auto a = read_file<float>(argv[3]);
        if (k == 0 || k % 32 || a.size() % k) return usage();
        Fp8Result r;
        device_fp8(a, r);
        write_fp8(argv[4], r);
        return 0;
    }
    if (mode == "device-e4m3-exhaustive" && argc == 2) {
        device_e4m3_exhaustive();
        return 0;
    }
#endif
    return usage();
}
