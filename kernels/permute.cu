// kvbm: layout permutation between LayerSeparate (one slab per layer, block-first inside)
// and FullyContiguous (block-major) for a list of block pairs.
//
// For one (block, layer), both layouts keep the block's outer_dim regions (K then V)
// adjacent: LayerSeparate at layer_base + block * span, FullyContiguous at
// block_base + block * block_bytes + layer * span, with span = outer_dim * region_bytes.
// So each (pair, layer) is one contiguous span on both sides and the copy is coalesced on
// both without staging through shared memory. Grid: x = 64 KiB chunk of a span,
// y = pair * num_layers + layer (both grid-strided).

#include "kvbm_copy.cuh"

extern "C" __global__ void kvbm_permute_blocks(
    const unsigned long long* __restrict__ layer_bases,
    unsigned long long block_base,
    const unsigned int* __restrict__ ls_blocks,
    const unsigned int* __restrict__ fc_blocks,
    unsigned int num_pairs,
    unsigned int num_layers,
    unsigned int outer_dim,
    unsigned long long region_bytes,
    int to_block_major)
{
    const unsigned long long span = (unsigned long long)outer_dim * region_bytes;
    const unsigned long long block_bytes = span * num_layers;
    const unsigned long long items = (unsigned long long)num_pairs * num_layers;
    for (unsigned long long item = blockIdx.y; item < items; item += gridDim.y) {
        const unsigned int pair = (unsigned int)(item / num_layers);
        const unsigned int layer = (unsigned int)(item % num_layers);
        unsigned char* ls = reinterpret_cast<unsigned char*>(
            layer_bases[layer] + (unsigned long long)ls_blocks[pair] * span);
        unsigned char* fc = reinterpret_cast<unsigned char*>(
            block_base + (unsigned long long)fc_blocks[pair] * block_bytes
            + (unsigned long long)layer * span);
        const unsigned char* src = to_block_major ? ls : fc;
        unsigned char* dst = to_block_major ? fc : ls;
        for (unsigned long long start = (unsigned long long)blockIdx.x * KVBM_CHUNK; start < span;
             start += (unsigned long long)gridDim.x * KVBM_CHUNK) {
            const unsigned long long rest = span - start;
            kvbm_copy_span(src + start, dst + start, rest < KVBM_CHUNK ? rest : KVBM_CHUNK);
        }
    }
}
