// kvbm: the copy loop shared by the kernels (included through NVRTC's header list).
#pragma once

#define KVBM_CHUNK 65536ull

// Copies `len` bytes with `T`-wide accesses, then the tail byte by byte. Every thread of
// the CTA takes a strided share, so consecutive threads touch consecutive words.
template <typename T>
__device__ __forceinline__ void kvbm_copy_as(
    const unsigned char* __restrict__ src, unsigned char* __restrict__ dst,
    unsigned long long len)
{
    const T* s = reinterpret_cast<const T*>(src);
    T* d = reinterpret_cast<T*>(dst);
    const unsigned long long words = len / sizeof(T);
    for (unsigned long long i = threadIdx.x; i < words; i += blockDim.x) {
        d[i] = s[i];
    }
    for (unsigned long long i = words * sizeof(T) + threadIdx.x; i < len; i += blockDim.x) {
        dst[i] = src[i];
    }
}

// The widest access both pointers are aligned for: 16, 8, 4 or 1 byte(s).
__device__ __forceinline__ void kvbm_copy_span(
    const unsigned char* __restrict__ src, unsigned char* __restrict__ dst,
    unsigned long long len)
{
    const unsigned long long bits =
        reinterpret_cast<unsigned long long>(src) | reinterpret_cast<unsigned long long>(dst);
    if ((bits & 15ull) == 0) {
        kvbm_copy_as<uint4>(src, dst, len);
    } else if ((bits & 7ull) == 0) {
        kvbm_copy_as<uint2>(src, dst, len);
    } else if ((bits & 3ull) == 0) {
        kvbm_copy_as<unsigned int>(src, dst, len);
    } else {
        kvbm_copy_as<unsigned char>(src, dst, len);
    }
}
