#pragma once
// Arch-neutral routing records shared by dispatch, the expert GEMMs and combine.
//
// A (token, slot) pair of source rank s routed to a local expert e becomes one row of the
// expert-grouped L1 input; rows of local expert e are [offsets[e], offsets[e + 1]).  The row index
// goes back into the source's pair_row[token, slot], which its combine uses to pull the row's L2
// output.  Row order inside an expert is whatever the atomics give: every row's result depends
// only on its own token and expert (the GEMMs accumulate each row in a fixed k order), so y is
// bit-stable run to run regardless.
#include <cstdint>

namespace deep_gemm::comm {

// The source of one dispatched row (the buffer's `l1_src` record).
struct RowSource {
    int rank, token, slot, local_expert;
};
static_assert(sizeof(RowSource) == 16, "l1_src is int32 [R, 4]");

}  // namespace deep_gemm::comm
