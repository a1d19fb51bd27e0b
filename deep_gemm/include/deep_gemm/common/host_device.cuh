#pragma once
// DG_HOST_DEVICE: functions that the kernels call and host programs (tests/cpp) compile with g++ too,
// so that one source defines both the device code and what the host tests check.
#if defined(__CUDACC__)
#define DG_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DG_HOST_DEVICE inline
#endif
