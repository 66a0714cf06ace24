// kvbm: layout permutations for a list of block pairs. `kvbm_permute_blocks`: between
// LayerSeparate (one slab per layer, block-first inside) and FullyContiguous (block-major).
// `kvbm_permute_regions` (below): between any two per-layer strided layouts.
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

// kvbm: block copies between any two layouts whose regions are addressed per layer:
// region (block, layer, outer) lies at base + block * block_stride + outer * outer_stride,
// with (base, block_stride, outer_stride) given per layer for each side. Every kvbm layout has
// this form: fully contiguous, layer-separate, outer-first (vLLM's FlashAttention
// `[2, num_blocks, ...]`), block-first (FlashInfer's `[num_blocks, 2, ...]`, any strides) and
// MLA. The addresses are computed here from block ids, so the host uploads 8 bytes per pair
// and 48 per layer instead of 24 per region.
//
// `maps` holds the source's layers, then the destination's: 3 words per layer. Item
// i = (pair * num_layers + layer) * outer_dim + outer; grid: x = 64 KiB chunk of a region,
// y = item (both grid-strided, 64-bit indices). Destinations must not overlap.

extern "C" __global__ void kvbm_permute_regions(
    const unsigned long long* __restrict__ maps,
    const unsigned int* __restrict__ src_blocks,
    const unsigned int* __restrict__ dst_blocks,
    unsigned int num_pairs,
    unsigned int num_layers,
    unsigned int outer_dim,
    unsigned long long region_bytes)
{
    const unsigned long long per_pair = (unsigned long long)num_layers * outer_dim;
    const unsigned long long items = (unsigned long long)num_pairs * per_pair;
    const unsigned long long* src_maps = maps;
    const unsigned long long* dst_maps = maps + 3ull * num_layers;
    for (unsigned long long item = blockIdx.y; item < items; item += gridDim.y) {
        const unsigned long long pair = item / per_pair;
        const unsigned long long rest = item % per_pair;
        const unsigned long long layer = rest / outer_dim;
        const unsigned long long outer = rest % outer_dim;
        const unsigned long long* s = src_maps + 3ull * layer;
        const unsigned long long* d = dst_maps + 3ull * layer;
        const unsigned char* src = reinterpret_cast<const unsigned char*>(
            s[0] + (unsigned long long)src_blocks[pair] * s[1] + outer * s[2]);
        unsigned char* dst = reinterpret_cast<unsigned char*>(
            d[0] + (unsigned long long)dst_blocks[pair] * d[1] + outer * d[2]);
        for (unsigned long long start = (unsigned long long)blockIdx.x * KVBM_CHUNK;
             start < region_bytes; start += (unsigned long long)gridDim.x * KVBM_CHUNK) {
            const unsigned long long left = region_bytes - start;
            kvbm_copy_span(src + start, dst + start, left < KVBM_CHUNK ? left : KVBM_CHUNK);
        }
    }
}
