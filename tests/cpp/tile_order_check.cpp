// Host check of deep_gemm/scheduler/tile_order.cuh (built and run by tests/test_mega_scheduler.py;
// plain C++, so the header must build without a CUDA compiler too).
//
// For every (row tiles, token tiles, token group) in a grid: expert_tile_coord must list the pairs
// in the order written out here by plain loops (groups of token tiles, row tiles, the group's token
// tiles), every pair once; with one group it must be row tile outer, token tile inner.
// `--fault` enumerates the expected order with groups one token tile larger, which the check must
// report (mismatches > 0).  Prints `key=value` lines.
#include <cstdio>
#include <cstring>
#include <vector>

#include <deep_gemm/scheduler/tile_order.cuh>

int main(int argc, char** argv) {
    const bool fault = argc > 1 && std::strcmp(argv[1], "--fault") == 0;
    long long cases = 0, pairs = 0, mismatches = 0, duplicates = 0, one_group_errors = 0, grouped_cases = 0;
    for (int rows = 1; rows <= 56; rows += rows < 8 ? 1 : 7)
        for (int tokens = 1; tokens <= 33; ++tokens)
            for (int group : {1, 2, 3, 4, 5, 7, 10, 16, 33, 34, 1 << 20, 0x7fffffff}) {
                const long long expect_group = fault ? group + 1LL : group;
                std::vector<int> seen(rows * tokens, 0);
                int local = 0;
                for (long long first = 0; first < tokens; first += expect_group) {
                    const int last = int(first + expect_group < tokens ? first + expect_group : tokens);
                    for (int r = 0; r < rows; ++r)
                        for (int t = int(first); t < last; ++t, ++local) {
                            const deep_gemm::TileCoord c = deep_gemm::expert_tile_coord(local, rows, tokens, group);
                            mismatches += c.row_tile != r || c.token_tile != t;
                            if (c.row_tile >= 0 && c.row_tile < rows && c.token_tile >= 0 && c.token_tile < tokens)
                                duplicates += seen[c.row_tile * tokens + c.token_tile]++ > 0;
                            else
                                ++mismatches;
                            if (group >= tokens)
                                one_group_errors += c.row_tile != local / tokens || c.token_tile != local % tokens;
                        }
                }
                ++cases, pairs += local, grouped_cases += group < tokens;
            }
    std::printf("summary cases=%lld pairs=%lld grouped_cases=%lld mismatches=%lld duplicates=%lld "
                "one_group_errors=%lld\n", cases, pairs, grouped_cases, mismatches, duplicates, one_group_errors);
    return 0;
}
