//! An engine's KV tensors as the tests lay them out: formats, padding, head order, layer
//! placement, and the index formulas (from the tensors' own strides) that the byte checks
//! use. Shared by the CPU tests (`external.rs`) and the GPU tests (`gpu_engine.rs`).
#![allow(dead_code, unreachable_pub)]

use kvbm_physical::{EngineFormat, LayerTensor, LayoutConfig};

/// How the test lays the engine's tensors out.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    pub format: EngineFormat,
    pub num_blocks: usize,
    pub num_layers: usize,
    pub outer_dim: usize,
    pub page: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub dtype: usize,
    /// Heads before tokens inside a page (vLLM's HND), instead of tokens first.
    pub hnd: bool,
    /// Elements of padding after each block (and, block-first, after each K/V page).
    pub pad: usize,
    /// Elements between one layer's tensor and the next's.
    pub gap: usize,
    /// Layers interleaved block by block in one allocation (`[num_blocks, layers, ...]`,
    /// vLLM's cross-layer blocks); block-first and MLA only, no padding.
    pub interleaved: bool,
}

impl Spec {
    pub fn config(&self) -> LayoutConfig {
        LayoutConfig {
            num_blocks: self.num_blocks,
            num_layers: self.num_layers,
            outer_dim: self.outer_dim,
            page_size: self.page,
            inner_dim: self.heads * self.head_dim,
            dtype_bytes: self.dtype,
        }
    }

    pub fn page_elems(&self) -> usize {
        self.page * self.heads * self.head_dim
    }

    /// Strides (elements) of the page's dimensions: (token, head, dim), or (token, latent).
    pub fn page_strides(&self) -> Vec<usize> {
        let (p, h, d) = (self.page, self.heads, self.head_dim);
        match (self.format, self.hnd) {
            (EngineFormat::Mla, _) => vec![h * d, 1],
            (_, false) => vec![h * d, d, 1],
            (_, true) => vec![d, p * d, 1],
        }
    }

    /// (block stride, outer stride) in elements, and the distance between layer bases.
    pub fn strides(&self) -> (usize, usize, usize) {
        let page = self.page_elems();
        let (n, o, l) = (self.num_blocks, self.outer_dim, self.num_layers);
        if self.interleaved {
            return (l * o * page, page, o * page);
        }
        let (block, outer) = match self.format {
            EngineFormat::OuterFirst => (page + self.pad, n * (page + self.pad)),
            EngineFormat::BlockFirst => (o * (page + self.pad) + self.pad, page + self.pad),
            _ => (page + self.pad, page), // MLA: one outer
        };
        let extent = (n - 1) * block + (o - 1) * outer + page;
        (block, outer, extent + self.gap)
    }

    /// Bytes the tensors span, from the first layer's address.
    pub fn arena_bytes(&self) -> usize {
        let (block, outer, layer) = self.strides();
        let last = (self.num_layers - 1) * layer
            + (self.num_blocks - 1) * block
            + (self.outer_dim - 1) * outer
            + self.page_elems();
        last * self.dtype
    }

    /// The tensors, over an arena whose first layer starts at `base`.
    pub fn tensors(&self, base: u64) -> Vec<LayerTensor> {
        let (block, outer, layer) = self.strides();
        let ps = self.page_strides();
        (0..self.num_layers)
            .map(|l| {
                let addr = base + (l * layer * self.dtype) as u64;
                let (p, h, d) = (self.page, self.heads, self.head_dim);
                let (shape, strides) = match self.format {
                    EngineFormat::OuterFirst => (
                        vec![self.outer_dim, self.num_blocks, p, h, d],
                        vec![outer, block, ps[0], ps[1], ps[2]],
                    ),
                    EngineFormat::BlockFirst => (
                        vec![self.num_blocks, self.outer_dim, p, h, d],
                        vec![block, outer, ps[0], ps[1], ps[2]],
                    ),
                    _ => (vec![self.num_blocks, p, h * d], vec![block, ps[0], ps[1]]),
                };
                LayerTensor {
                    addr,
                    shape,
                    strides,
                }
            })
            .collect()
    }

    /// Element offset of `(token, head, dim)` inside a page (`(token, 0, latent)` for MLA).
    fn page_offset(&self, idx: [usize; 3]) -> usize {
        let ps = self.page_strides();
        match self.format {
            EngineFormat::Mla => idx[0] * ps[0] + idx[2] * ps[1],
            _ => idx[0] * ps[0] + idx[1] * ps[1] + idx[2] * ps[2],
        }
    }

    /// Byte offset, from the first layer's address, of byte `e` of element `idx` of block
    /// `block`'s `outer` page in layer `layer`: the tensor's own index formula.
    pub fn engine_byte(
        &self,
        block: usize,
        layer: usize,
        outer: usize,
        idx: [usize; 3],
        e: usize,
    ) -> usize {
        let (b, o, l) = self.strides();
        (layer * l + block * b + outer * o + self.page_offset(idx)) * self.dtype + e
    }

    /// Byte offset in the fully contiguous layout of the same element: the block's region
    /// `(layer, outer)`, holding the page as the engine stores it.
    pub fn fc_byte(
        &self,
        block: usize,
        layer: usize,
        outer: usize,
        idx: [usize; 3],
        e: usize,
    ) -> usize {
        let c = self.config();
        let region = c.region_bytes().unwrap();
        block * c.block_bytes().unwrap()
            + (layer * c.outer_dim + outer) * region
            + self.page_offset(idx) * self.dtype
            + e
    }

    /// Every element index of a page: (token, head, dim), or (token, 0, latent).
    pub fn page_indices(&self) -> Vec<[usize; 3]> {
        let mut out = Vec::new();
        for t in 0..self.page {
            match self.format {
                EngineFormat::Mla => {
                    for x in 0..self.heads * self.head_dim {
                        out.push([t, 0, x]);
                    }
                }
                _ => {
                    for h in 0..self.heads {
                        for x in 0..self.head_dim {
                            out.push([t, h, x]);
                        }
                    }
                }
            }
        }
        out
    }
}
