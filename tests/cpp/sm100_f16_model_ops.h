// The kind::f16 recipes' recording ops (what GemmPlan::dequant_tile and the TS MMA call), shared by
// the grouped-GEMM emitter (sm100_f16_model_emit.cpp) and the fused kernel's (sm100_fused_model_emit.cpp):
// a mixin over an emitter's recording Ops (Base: head(op), record(line), warp, lane).  The ops' JSON is
// described in sm100_f16_model_emit.cpp's header; tests/sm100_model/f16.py executes them (F16Machine).
// warp_arrive (a __syncwarp, then lane 0's arrive) is the emitter's: it needs its scheduler.
#pragma once
#include <cstdint>
#include <sstream>
#include <string>

namespace f16_model {

inline uint32_t g_tag = 1;   // register tags: the emitters' schedulers serialise every thread, so a plain counter is safe

template <class Base>
struct F16Record : Base {
    using Base::Base;
    using Base::head;
    using Base::record;

    std::string who() const { return ",\"warp\":" + std::to_string(this->warp) + ",\"lane\":" + std::to_string(this->lane); }
    static std::string tags(const uint32_t* t, int n) {
        std::string s = "[";
        for (int i = 0; i < n; ++i) s += (i ? "," : "") + std::to_string(t[i]);
        return s + "]";
    }

    void lds128(uint32_t addr, uint32_t (&v)[4]) {
        for (auto& x : v) x = g_tag++;
        record(head("lds") + who() + ",\"addr\":" + std::to_string(addr) + ",\"bytes\":16,\"tags\":" + tags(v, 4) + "}");
    }
    uint32_t lds32(uint32_t addr) {
        const uint32_t t = g_tag++;
        record(head("lds") + who() + ",\"addr\":" + std::to_string(addr) + ",\"bytes\":4,\"tags\":[" + std::to_string(t) + "]}");
        return t;
    }
    void dequant_chunk(const uint32_t (&codes)[4], uint32_t scale_word, int first_byte, uint32_t (&regs)[16]) {
        for (auto& x : regs) x = g_tag++;
        record(head("dequant_chunk") + who() + ",\"codes\":" + tags(codes, 4) + ",\"scale\":" + std::to_string(scale_word) +
               ",\"first_byte\":" + std::to_string(first_byte) + ",\"out\":" + tags(regs, 16) + "}");
    }
    template <int kNum>
    void tmem_st(int w, int l, uint32_t taddr, const uint32_t (&regs)[kNum]) {
        record(head("tmem_st") + ",\"warp\":" + std::to_string(w) + ",\"lane\":" + std::to_string(l) +
               ",\"shape\":\"32x32b\",\"num\":" + std::to_string(kNum) + ",\"taddr\":" + std::to_string(taddr) +
               ",\"regs\":" + tags(regs, kNum) + "}");
    }
    void tmem_st_wait() { record(head("tmem_st_wait") + who() + "}"); }
    void mma_ts(uint32_t idesc, uint32_t a_taddr, uint64_t bdesc, uint32_t d, bool acc) {
        std::ostringstream o;
        o << head("mma_ts") << ",\"kind\":\"f16\",\"idesc\":" << idesc << ",\"a\":" << a_taddr << ",\"bdesc\":" << bdesc
          << ",\"d\":" << d << ",\"acc\":" << (acc ? 1 : 0) << "}";
        record(o.str());
    }
};

}  // namespace f16_model
