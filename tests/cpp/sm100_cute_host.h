// Shared set-up of the host (g++) conformance programs tests/cpp/sm100_conformance.cpp and
// sm100_f16_conformance.cpp: CuTe's shared-memory pointer shim, CuTe and the kernel's own headers, the
// negative-control switch and the per-check counter that prints one JSON line.
//
// The including program defines the shared-memory buffer (alignas(1024) static char g_smem[...]) and sets
// g_smem_base = g_smem and g_break = argv[1] (when given) in main.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

// CuTe's smem descriptors take shared-memory addresses: on the host, offsets from g_smem_base
static char* g_smem_base = nullptr;
static inline size_t __cvta_generic_to_shared(const void* p) { return (size_t)((const char*)p - g_smem_base); }
#define CUTE_CVTA_GENERIC_TO_SHARED_ACTIVATED 1

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm100.hpp>
#include <cute/atom/copy_traits_sm100.hpp>

#include <deep_gemm/common/sm100_umma.cuh>
#include <deep_gemm/scheduler/sm100_gemm_plan.cuh>

using namespace cute;
namespace dg = deep_gemm::sm100;

static std::string g_break;
static bool brk(const char* name) { return g_break == name; }

struct Check {
    const char* name;
    long cases = 0, mismatches = 0;
    std::string first;
    explicit Check(const char* n) : name(n) {}
    void eq(unsigned long long kernel, unsigned long long cute, const std::string& what) {
        ++cases;
        if (kernel != cute) {
            if (std::getenv("DG_CONF_VERBOSE")) std::fprintf(stderr, "%s: %s kernel=%#llx cute=%#llx\n", name, what.c_str(), kernel, cute);
            if (!mismatches) {
                char buf[160];
                std::snprintf(buf, sizeof(buf), " kernel=%#llx cute=%#llx", kernel, cute);
                first = what + buf;
            }
            ++mismatches;
        }
    }
    ~Check() {
        std::printf("{\"check\":\"%s\",\"cases\":%ld,\"mismatches\":%ld,\"first\":\"%s\"}\n", name, cases, mismatches, first.c_str());
    }
};

static std::string fmt(const char* f, long a = 0, long b = 0, long c = 0, long d = 0) {
    char buf[200];
    std::snprintf(buf, sizeof(buf), f, a, b, c, d);
    return buf;
}
