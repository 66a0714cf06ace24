// kvbm: batched copy of many (src, dst, len) regions in one launch.
//
// Grid: x = 64 KiB chunk within a region, y = region (both grid-strided). Each CTA copies
// one chunk with the widest access both pointers allow: 16, 8, 4 or 1 byte(s). Works for
// device <-> device and device <-> mapped pinned host memory (unified addressing).
// Grid-stride indices are 64-bit: a 32-bit one would wrap past 2^32 - gridDim.y regions and
// loop forever.

#include "kvbm_copy.cuh"

extern "C" __global__ void kvbm_batched_copy(
    const unsigned long long* __restrict__ srcs,
    const unsigned long long* __restrict__ dsts,
    const unsigned long long* __restrict__ sizes,
    unsigned int num_regions)
{
    for (unsigned long long r = blockIdx.y; r < num_regions; r += gridDim.y) {
        const unsigned long long len = sizes[r];
        const unsigned char* src = reinterpret_cast<const unsigned char*>(srcs[r]);
        unsigned char* dst = reinterpret_cast<unsigned char*>(dsts[r]);
        for (unsigned long long start = (unsigned long long)blockIdx.x * KVBM_CHUNK; start < len;
             start += (unsigned long long)gridDim.x * KVBM_CHUNK) {
            const unsigned long long rest = len - start;
            kvbm_copy_span(src + start, dst + start, rest < KVBM_CHUNK ? rest : KVBM_CHUNK);
        }
    }
}
