//! Block copies between layouts: the [`TransferEngine`].
//!
//! A transfer copies a batch of `(source block, destination block)` pairs, optionally for a
//! range of layers, between any two [`Layout`]s of equal shape (same layers, outer dimension
//! and region size; the kinds and memories may differ). It is checked whole before anything
//! moves; contiguous regions are coalesced into one copy each; the blocks are locked until
//! the copy completes, so no one reads a half-written block or writes one being read.
//!
//! **Ordering against the engine.** On a GPU, the engine's kernels and kvbm's copies run on
//! different streams. A transfer that reads blocks the engine's kernels wrote (offload), or
//! writes blocks they may still read, waits for the engine's [`CudaEvent`]s on kvbm's copy
//! stream ([`CopyOptions::wait_for`]: `cuStreamWaitEvent`, the host never waits); the engine's
//! stream waits for the transfer's [`completion_event`](TransferHandle::completion_event)
//! before its kernels read onboarded blocks. The copy stream is one per [`CudaDevice`]
//! handle and in order: a transfer queued after one that waits on an engine event starts
//! after that event too. Host copies (`Memcpy`) complete inside the call and take no event.

use std::ops::Range;
use std::sync::Arc;

use kvbm_logical::BlockId;

use crate::cuda::{CudaDevice, CudaEvent, Run};
use crate::error::{Side, TransferError};
use crate::faults::FaultInjector;
use crate::layout::{LayerMap, Layout};
use crate::storage::MemoryKind;
use kvbm_kernels::reference::RegionShape;

/// How a batch is copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Strategy {
    /// `memcpy` on the calling thread; host memory on both sides. Completes before
    /// [`TransferEngine::copy_blocks`] returns.
    Memcpy,
    /// One `cuMemcpyAsync` per coalesced run on the engine's CUDA stream.
    AsyncCopies,
    /// One batched driver copy call for the whole batch: `cuMemcpyBatchAsync` on CUDA 12.8
    /// and 12.9 drivers, `cuMemcpyBatchAsync_v2` on 13.0 and later (see
    /// [`CudaDevice::has_batched_copy`]).
    BatchedDriver,
    /// One launch of the `kvbm_batched_copy` kernel (from `kvbm-kernels`) for the whole
    /// batch; device or pinned memory on both sides.
    Kernel,
    /// One launch of the `kvbm_permute_regions` kernel for the whole batch: the GPU computes
    /// every region's address from the block ids and the layouts' [layer
    /// maps](crate::Layout::layer_map), so the host neither coalesces nor uploads a list of
    /// regions. Between any two layouts (outer-first, block-first, MLA, layer-separate ⇄
    /// fully contiguous is the point); device or pinned memory on both sides.
    Permute,
}

impl Strategy {
    /// Every strategy.
    pub const ALL: [Strategy; 5] = [
        Strategy::Memcpy,
        Strategy::AsyncCopies,
        Strategy::BatchedDriver,
        Strategy::Kernel,
        Strategy::Permute,
    ];

    /// Short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Memcpy => "memcpy",
            Strategy::AsyncCopies => "async",
            Strategy::BatchedDriver => "batched",
            Strategy::Kernel => "kernel",
            Strategy::Permute => "permute",
        }
    }
}

/// Options of one transfer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyOptions {
    /// Copy only these layers (default: all).
    pub layers: Option<Range<usize>>,
    /// Force a strategy (default: the engine picks; see [`TransferEngine::copy_blocks`]).
    pub strategy: Option<Strategy>,
    /// Engine events the copy waits for on the GPU before it reads or writes anything
    /// (`cuStreamWaitEvent` on the copy stream; the host does not wait): the work recorded
    /// in each when the transfer is issued. Refused by `Memcpy`, which runs on the host.
    pub wait_for: Vec<CudaEvent>,
}

impl CopyOptions {
    /// Only `layers`.
    pub fn layers(layers: Range<usize>) -> Self {
        Self {
            layers: Some(layers),
            ..Self::default()
        }
    }

    /// With `strategy` forced.
    pub fn strategy(strategy: Strategy) -> Self {
        Self {
            strategy: Some(strategy),
            ..Self::default()
        }
    }

    /// These options, also waiting for `event` (see [`wait_for`](Self::wait_for)).
    ///
    /// ```
    /// use kvbm_physical::{CopyOptions, CudaDevice, CudaEvent};
    /// if let Ok(gpu) = CudaDevice::open(0) {
    ///     // ... the engine's kernels write KV on its stream (here the legacy default one) ...
    ///     // SAFETY: null names the legacy default stream, which always exists.
    ///     let written = unsafe { CudaEvent::record_raw(&gpu, std::ptr::null_mut()) }?;
    ///     let options = CopyOptions::layers(0..4).waiting_for(written);
    ///     assert_eq!(options.wait_for.len(), 1);
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn waiting_for(mut self, event: CudaEvent) -> Self {
        self.wait_for.push(event);
        self
    }
}

/// What a transfer did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransferReport {
    /// The strategy used.
    pub strategy: Strategy,
    /// Pairs copied.
    pub pairs: usize,
    /// Bytes copied.
    pub bytes: usize,
    /// Copies issued after coalescing (memcpy calls, or regions handed to the driver).
    pub copies: usize,
}

/// Copies blocks between layouts. Host-only engines ([`TransferEngine::host`]) copy with
/// `memcpy`; an engine with a [`CudaDevice`] also copies to, from and within GPU memory on
/// its stream, completing through a CUDA event (never a device-wide synchronisation).
///
/// ```
/// use kvbm_logical::BlockId;
/// use kvbm_physical::{CopyOptions, Layout, LayoutConfig, LayoutKind, Strategy, TransferEngine};
/// let c = LayoutConfig { num_blocks: 4, num_layers: 2, outer_dim: 2, page_size: 4, inner_dim: 8, dtype_bytes: 2 };
/// let g1 = Layout::system(LayoutKind::LayerSeparate, c)?.into_shared();
/// let g2 = Layout::system(LayoutKind::FullyContiguous, c)?.into_shared();
/// let image: Vec<u8> = (0..g1.block_bytes()).map(|i| (i * 7 + 1) as u8).collect();
/// g1.write_block(BlockId::new(1), &image)?;
///
/// let engine = TransferEngine::host();
/// let pairs = [(BlockId::new(1), BlockId::new(3))];
/// let report = engine.copy_blocks(&g1, &g2, &pairs, &CopyOptions::default())?.wait()?;
/// assert_eq!(report.strategy, Strategy::Memcpy);
/// assert_eq!(report.copies, 2); // one run per layer on the layer-separate side
///
/// let mut back = vec![0; g2.block_bytes()];
/// g2.read_block(BlockId::new(3), &mut back)?;
/// assert_eq!(back, image);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct TransferEngine {
    cuda: Option<CudaDevice>,
    faults: Option<Arc<dyn FaultInjector>>,
}

impl TransferEngine {
    /// An engine for host memory only.
    pub fn host() -> Self {
        Self::default()
    }

    /// An engine copying on `cuda`'s stream (and with `memcpy` between host layouts).
    ///
    /// Compiles and loads the copy kernels now (NVRTC, once per process and device; where
    /// NVRTC is missing the kernel strategies are simply not used): loading a module may
    /// synchronize the context, which must not happen inside a transfer, behind the engine's
    /// own work.
    pub fn with_cuda(cuda: CudaDevice) -> Self {
        if !cuda.has_kernels() {
            tracing::info!(
                device = cuda.ordinal(),
                "no copy kernels (NVRTC): the driver's copies only"
            );
        }
        Self {
            cuda: Some(cuda),
            faults: None,
        }
    }

    /// Installs a fault injector (tests and failure drills); see [`FaultPlan`](crate::FaultPlan).
    pub fn with_faults(mut self, faults: Arc<dyn FaultInjector>) -> Self {
        self.faults = Some(faults);
        self
    }

    /// The CUDA device, if any.
    pub fn cuda(&self) -> Option<&CudaDevice> {
        self.cuda.as_ref()
    }

    /// The strategy chosen when none is forced, for `runs` coalesced copies of `bytes` in
    /// all:
    /// - `Memcpy` between host memories;
    /// - `Kernel` for many small runs (at least [`KERNEL_MIN_RUNS`](Self::KERNEL_MIN_RUNS),
    ///   averaging at most [`KERNEL_MAX_AVG_RUN`](Self::KERNEL_MAX_AVG_RUN) bytes) when both
    ///   sides are device or pinned memory and the kernels load (the first such call compiles
    ///   them, once per process and device): one launch instead of one driver call per run;
    /// - else `BatchedDriver` for several runs where the driver has it (CUDA 12.8+) and
    ///   neither side is pageable;
    /// - else `AsyncCopies`.
    pub fn pick_strategy(
        &self,
        src: MemoryKind,
        dst: MemoryKind,
        runs: usize,
        bytes: usize,
    ) -> Strategy {
        if src.is_host() && dst.is_host() {
            return Strategy::Memcpy;
        }
        let Some(cuda) = &self.cuda else {
            return Strategy::AsyncCopies;
        };
        let pageable = src == MemoryKind::System || dst == MemoryKind::System;
        if !pageable
            && runs >= Self::KERNEL_MIN_RUNS
            && bytes / runs.max(1) <= Self::KERNEL_MAX_AVG_RUN
            && cuda.has_kernels()
        {
            Strategy::Kernel
        } else if !pageable && runs > 1 && cuda.has_batched_copy() {
            Strategy::BatchedDriver
        } else {
            Strategy::AsyncCopies
        }
    }

    /// Whether [`copy_blocks`](Self::copy_blocks), choosing, takes `Strategy::Permute`:
    /// both layouts in device or pinned memory; not both with contiguous block images (two
    /// fully contiguous layouts coalesce block by block, which the driver copies best); at
    /// least [`KERNEL_MIN_RUNS`](Self::KERNEL_MIN_RUNS) regions (`pairs × layers ×
    /// outer_dim`) of at most [`KERNEL_MAX_AVG_RUN`](Self::KERNEL_MAX_AVG_RUN) bytes each;
    /// and the kernels load (the first such call compiles them). In practice: offload and
    /// onboard of many blocks between an engine's layer-separate, outer-first, block-first or
    /// MLA memory and a fully contiguous pinned pool.
    ///
    /// ```
    /// use kvbm_physical::{Layout, LayoutConfig, LayoutKind, TransferEngine};
    /// let c = LayoutConfig { num_blocks: 64, num_layers: 4, outer_dim: 2, page_size: 16, inner_dim: 64, dtype_bytes: 2 };
    /// let engine_side = Layout::system(LayoutKind::OuterFirst, c)?;
    /// let pool = Layout::system(LayoutKind::FullyContiguous, c)?;
    /// // Host memory and a host engine: never the kernel.
    /// assert!(!TransferEngine::host().prefers_permute(&engine_side, &pool, 64, 4));
    /// # Ok::<(), kvbm_physical::LayoutError>(())
    /// ```
    pub fn prefers_permute(&self, src: &Layout, dst: &Layout, pairs: usize, layers: usize) -> bool {
        let Some(cuda) = &self.cuda else {
            return false;
        };
        let reachable = |m: MemoryKind| m != MemoryKind::System;
        let regions = pairs
            .saturating_mul(layers)
            .saturating_mul(src.config().outer_dim);
        reachable(src.memory())
            && reachable(dst.memory())
            && !(src.contiguous_images() && dst.contiguous_images())
            && regions >= Self::KERNEL_MIN_RUNS
            && src.region_bytes() <= Self::KERNEL_MAX_AVG_RUN
            && cuda.has_kernels()
    }

    /// Fewest runs for which [`pick_strategy`](Self::pick_strategy) prefers the kernel.
    pub const KERNEL_MIN_RUNS: usize = 64;
    /// Largest average run (bytes) for which it prefers the kernel.
    pub const KERNEL_MAX_AVG_RUN: usize = 256 << 10;

    /// Copies `pairs` from `src` into `dst`; returns a handle to wait on.
    ///
    /// Unless `options` forces one, the strategy is `Permute` where
    /// [`prefers_permute`](Self::prefers_permute) says so, else the
    /// [`pick_strategy`](Self::pick_strategy) for the coalesced runs.
    ///
    /// Refused, with nothing copied and no byte or checksum changed, on: an empty batch,
    /// layouts of different shape (layers, outer dimension, region size), an invalid layer
    /// range, a block id out of range, a strategy that cannot reach the memories (or device
    /// memory of another GPU than the engine's), events to wait for with `Memcpy`, a
    /// destination listed twice, a block that is both source and destination, a block busy
    /// in another transfer, or a source block whose checksum no longer matches its bytes.
    ///
    /// The strategy is chosen and checked before any block is locked, so choosing the
    /// kernel (which compiles it on first use) never holds blocks.
    ///
    /// A copy that fails part-way returns [`TransferError::CopyFailed`] once every copy it
    /// enqueued has finished: the listed destinations hold no valid data (their checksums
    /// are cleared), the others were written (their checksums are recorded).
    pub fn copy_blocks(
        &self,
        src: &Arc<Layout>,
        dst: &Arc<Layout>,
        pairs: &[(BlockId, BlockId)],
        options: &CopyOptions,
    ) -> Result<TransferHandle, TransferError> {
        let layers = validate(src, dst, pairs, options.layers.clone())?;
        let bytes = pairs.len() * layers.len() * src.config().outer_dim * src.region_bytes();
        let permute = match options.strategy {
            Some(s) => s == Strategy::Permute,
            None => self.prefers_permute(src, dst, pairs.len(), layers.len()),
        };
        // The permutation kernel computes its regions on the GPU: no runs.
        let mut runs = if permute {
            Vec::new()
        } else {
            coalesce(src, dst, pairs, layers.clone())
        };
        let strategy = match options.strategy {
            Some(s) => s,
            None if permute => Strategy::Permute,
            None => self.pick_strategy(src.memory(), dst.memory(), runs.len(), bytes),
        };
        let gpu = self.reach(strategy, src.memory(), dst.memory())?;
        if gpu.is_none() && !options.wait_for.is_empty() {
            return Err(TransferError::Unsupported {
                strategy,
                src: src.memory(),
                dst: dst.memory(),
                reason: "memcpy runs on the host and cannot wait for CUDA events",
            });
        }
        let locks = BatchLocks::acquire(src, dst, pairs)?;
        if src.has_checksums() {
            verify_checksums(src, pairs)?;
        }
        // Nothing below refuses: from here the handle settles every outcome.
        // Injected failures: those pairs are not copied (their destinations get garbage).
        let injected = match &self.faults {
            Some(f) => {
                // Any injector's answer, in range, sorted and once each (the searches below
                // need that; an index past the batch names no pair).
                let mut v = f.failed_pairs(src.memory(), dst.memory(), pairs);
                v.retain(|&i| i < pairs.len());
                v.sort_unstable();
                v.dedup();
                v
            }
            None => Vec::new(),
        };
        // `kept[j]`: the batch index of the j-th pair copied (empty: all are).
        let kept: Vec<usize> = if injected.is_empty() {
            Vec::new()
        } else {
            let kept: Vec<usize> = (0..pairs.len())
                .filter(|i| injected.binary_search(i).is_err())
                .collect();
            let to_copy: Vec<(BlockId, BlockId)> = kept.iter().map(|&i| pairs[i]).collect();
            runs = if to_copy.is_empty() || permute {
                Vec::new()
            } else {
                coalesce(src, dst, &to_copy, layers.clone())
            };
            kept
        };
        let report = TransferReport {
            strategy,
            pairs: pairs.len(),
            bytes,
            copies: if permute {
                pairs.len() * layers.len() * src.config().outer_dim
            } else {
                runs.len()
            },
        };
        let mut handle = TransferHandle {
            report,
            checksum_pairs: if dst.has_checksums() {
                pairs.to_vec()
            } else {
                Vec::new()
            },
            locks: Some(locks),
            event: None,
            injected,
            faults: self.faults.clone(),
        };
        if !handle.injected.is_empty() && dst.memory().is_host() {
            scribble(dst, pairs, &handle.injected, layers.clone());
        }
        let Some(cuda) = gpu else {
            // Memcpy: `reach` checked both sides are host memory.
            let stream = bytes >= crate::memcpy::STREAM_BATCH_BYTES;
            for run in &runs {
                // SAFETY: every run lies inside live host slabs (validated ids and
                // layers); the batch holds read locks on its sources and write locks
                // on its destinations, and no block is both, so no one else touches
                // the ranges and they do not overlap.
                unsafe {
                    crate::memcpy::copy(run.dst as *mut u8, run.src as *const u8, run.len, stream)
                };
            }
            // Streaming stores must be ordered before the locks' release.
            crate::memcpy::fence();
            handle.finish(Ok(()))?;
            return Ok(handle);
        };
        let work = if permute {
            let all = handle.injected.is_empty();
            region_work(src, dst, pairs, (!all).then_some(kept.as_slice()), layers)
        } else {
            Work::Runs(&runs)
        };
        self.enqueue(
            cuda,
            strategy,
            work,
            &kept,
            &options.wait_for,
            src.memory(),
            dst.memory(),
            handle,
        )
    }

    /// Checks that `strategy` can copy between `src` and `dst` memory on this engine;
    /// returns the CUDA device to copy with (`None` for `Memcpy`).
    fn reach(
        &self,
        strategy: Strategy,
        src: MemoryKind,
        dst: MemoryKind,
    ) -> Result<Option<&CudaDevice>, TransferError> {
        check_reach(
            strategy,
            self.cuda.as_ref().map(CudaDevice::ordinal),
            src,
            dst,
        )?;
        if strategy == Strategy::Memcpy {
            return Ok(None);
        }
        let cuda = self.cuda.as_ref().ok_or(TransferError::Unsupported {
            strategy,
            src,
            dst,
            reason: "the engine has no CUDA device",
        })?;
        if matches!(strategy, Strategy::Kernel | Strategy::Permute) && !cuda.has_kernels() {
            return Err(TransferError::Unsupported {
                strategy,
                src,
                dst,
                reason: "the copy kernels did not compile or load (NVRTC 13.0 needed)",
            });
        }
        Ok(Some(cuda))
    }

    /// Makes `cuda`'s stream wait for `wait_for`, enqueues the batch's copies on it and
    /// records the completion event. On any failure, waits until nothing the batch enqueued
    /// still runs, then settles the handle (landed pairs get their checksums, failed ones
    /// lose theirs, locks are released).
    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        &self,
        cuda: &CudaDevice,
        strategy: Strategy,
        work: Work<'_>,
        kept: &[usize],
        wait_for: &[CudaEvent],
        src: MemoryKind,
        dst: MemoryKind,
        mut handle: TransferHandle,
    ) -> Result<TransferHandle, TransferError> {
        let injected = |call| crate::StorageError::Cuda {
            call,
            error: "injected fault".into(),
        };
        // A launch is one unit of failure: the permutation counts as one run.
        let units = match &work {
            Work::Runs(runs) => runs.len(),
            Work::Regions { pairs, .. } => usize::from(!pairs.is_empty()),
        };
        let fail_at = self
            .faults
            .as_ref()
            .and_then(|f| f.failed_enqueue(strategy, units))
            .filter(|&k| k < units);
        let enqueued = match cuda.wait_events(wait_for) {
            // Nothing of the batch was enqueued: every pair fails, as at run 0.
            Err(e) => Err((0, e)),
            Ok(()) => match (&work, strategy, fail_at) {
                (Work::Regions { .. }, _, Some(_)) => Err((0, injected("kvbm_permute_regions"))),
                (Work::Regions { pairs, .. }, _, None) if pairs.is_empty() => Ok(()),
                (
                    Work::Regions {
                        src,
                        dst,
                        pairs,
                        shape,
                    },
                    _,
                    None,
                ) => cuda
                    .copy_regions(src, dst, pairs, *shape)
                    .map_err(|e| (0, e)),
                (Work::Runs(runs), Strategy::AsyncCopies, Some(k)) => cuda
                    .copy_async(&runs[..k])
                    .and_then(|()| Err((k, injected("cuMemcpyAsync")))),
                (Work::Runs(runs), Strategy::AsyncCopies, None) => cuda.copy_async(runs),
                (Work::Runs(_), Strategy::BatchedDriver, Some(_)) => {
                    Err((0, injected("cuMemcpyBatchAsync")))
                }
                (Work::Runs(runs), Strategy::BatchedDriver, None) => {
                    cuda.copy_batched(runs, src, dst).map_err(|e| (0, e))
                }
                (Work::Runs(_), _, Some(_)) => Err((0, injected("kvbm_batched_copy"))),
                (Work::Runs(runs), _, None) => cuda.copy_kernel(runs).map_err(|e| (0, e)),
            },
        };
        let runs: &[Run] = match &work {
            Work::Runs(runs) => runs,
            Work::Regions { .. } => &[],
        };
        // Record even after a failure: runs already enqueued must land before the locks
        // (and the layouts they keep alive) are released.
        let recorded = if self.faults.as_ref().is_some_and(|f| f.fail_event_record()) {
            Err(injected("cuEventRecord"))
        } else {
            cuda.record()
        };
        let (enqueued, recorded) = match (enqueued, recorded) {
            (Ok(()), Ok(event)) => {
                handle.event = Some(event);
                return Ok(handle);
            }
            other => other,
        };
        // Something failed: wait for whatever was enqueued, through the event if there is
        // one, else by draining the stream, before any lock is released.
        let (landed, record_error) = match recorded {
            Ok(event) => (event.wait(), None), // the event goes back to the pool here
            Err(e) => (cuda.synchronize(), Some(e)),
        };
        let pairs = handle.report.pairs;
        let mut failed: Vec<usize> = match (&enqueued, &landed) {
            // Unknown what landed: nothing is trusted.
            (_, Err(_)) => (0..pairs).collect(),
            // Runs before the failed one landed; a run's `first_pair` says from which
            // copied pair on the batch is invalid.
            (Err((run, _)), Ok(())) => pairs_from_run(runs, *run, kept, pairs),
            // Only the event failed, and the drained stream proved every copy landed.
            (Ok(()), Ok(())) => Vec::new(),
        };
        failed.extend_from_slice(&handle.injected);
        failed.sort_unstable();
        failed.dedup();
        handle.injected.clear();
        handle.settle(&failed);
        if failed.is_empty() {
            return Ok(handle);
        }
        let mut error: Vec<String> = Vec::new();
        if let Err((_, e)) = &enqueued {
            error.push(e.to_string());
        }
        if let Some(e) = &record_error {
            error.push(e.to_string());
        }
        if let Err(e) = &landed {
            error.push(format!("waiting for the enqueued copies: {e}"));
        }
        if error.is_empty() {
            error.push("injected fault".into());
        }
        Err(TransferError::CopyFailed {
            failed,
            error: error.join("; "),
        })
    }

    /// [`copy_blocks`](Self::copy_blocks), then waits.
    pub fn copy_blocks_blocking(
        &self,
        src: &Arc<Layout>,
        dst: &Arc<Layout>,
        pairs: &[(BlockId, BlockId)],
        options: &CopyOptions,
    ) -> Result<TransferReport, TransferError> {
        self.copy_blocks(src, dst, pairs, options)?.wait()
    }
}

/// What a GPU batch enqueues: coalesced runs, or one permutation over layer maps.
enum Work<'a> {
    Runs(&'a [Run]),
    Regions {
        src: &'a [LayerMap],
        dst: &'a [LayerMap],
        /// The copied pairs' block ids.
        pairs: Vec<(u32, u32)>,
        shape: RegionShape,
    },
}

/// The permutation kernel's work for a batch: both layouts' maps of the copied layers, the
/// block ids of the copied pairs (`kept`: their batch indices; `None`: every pair), and the
/// region shape.
fn region_work<'a>(
    src: &'a Layout,
    dst: &'a Layout,
    pairs: &[(BlockId, BlockId)],
    kept: Option<&[usize]>,
    layers: Range<usize>,
) -> Work<'a> {
    let id = |(a, b): (BlockId, BlockId)| (a.get(), b.get());
    let copied: Vec<(u32, u32)> = match kept {
        None => pairs.iter().copied().map(id).collect(),
        Some(kept) => kept.iter().map(|&i| id(pairs[i])).collect(),
    };
    Work::Regions {
        src: &src.layer_maps()[layers.clone()],
        dst: &dst.layer_maps()[layers],
        pairs: copied,
        shape: RegionShape {
            outer_dim: src.config().outer_dim,
            region_bytes: src.region_bytes(),
        },
    }
}

/// Checks the request; returns the layer range.
fn validate(
    src: &Layout,
    dst: &Layout,
    pairs: &[(BlockId, BlockId)],
    layers: Option<Range<usize>>,
) -> Result<Range<usize>, TransferError> {
    if pairs.is_empty() {
        return Err(TransferError::EmptyBatch);
    }
    let (s, d) = (src.config(), dst.config());
    for (what, a, b) in [
        ("num_layers", s.num_layers, d.num_layers),
        ("outer_dim", s.outer_dim, d.outer_dim),
        ("region bytes", src.region_bytes(), dst.region_bytes()),
    ] {
        if a != b {
            return Err(TransferError::LayoutMismatch {
                what,
                src: a,
                dst: b,
            });
        }
    }
    let layers = layers.unwrap_or(0..s.num_layers);
    if layers.start >= layers.end || layers.end > s.num_layers {
        return Err(TransferError::LayerRange {
            start: layers.start,
            end: layers.end,
            num_layers: s.num_layers,
        });
    }
    for (index, &(a, b)) in pairs.iter().enumerate() {
        for (side, block, layout) in [(Side::Source, a, src), (Side::Destination, b, dst)] {
            if block.index() >= layout.num_blocks() {
                return Err(TransferError::BlockOutOfRange {
                    index,
                    side,
                    block,
                    num_blocks: layout.num_blocks(),
                });
            }
        }
    }
    Ok(layers)
}

/// The batch indices (of `pairs` in all) whose copies did not land when the enqueue failed
/// at run `failed_run` and every earlier run landed: from that run's `first_pair` on, in the
/// batch's numbering (`kept[j]` is the batch index of the j-th copied pair; empty when
/// every pair was copied). No run at all means every pair was injected to fail.
fn pairs_from_run(runs: &[Run], failed_run: usize, kept: &[usize], pairs: usize) -> Vec<usize> {
    match runs.get(failed_run) {
        Some(run) if kept.is_empty() => (run.first_pair..pairs).collect(),
        Some(run) => kept[run.first_pair..].to_vec(),
        None => (0..pairs).collect(),
    }
}

/// Whether `strategy` can copy from `src` to `dst` memory on an engine whose CUDA device has
/// ordinal `engine` (`None`: a host-only engine). Device memory of another GPU is refused:
/// the engine's stream and kernels run in its own device's context.
fn check_reach(
    strategy: Strategy,
    engine: Option<usize>,
    src: MemoryKind,
    dst: MemoryKind,
) -> Result<(), TransferError> {
    let unsupported = |reason| TransferError::Unsupported {
        strategy,
        src,
        dst,
        reason,
    };
    if strategy == Strategy::Memcpy {
        return if src.is_host() && dst.is_host() {
            Ok(())
        } else {
            Err(unsupported("memcpy needs host memory on both sides"))
        };
    }
    let Some(engine) = engine else {
        return Err(unsupported("the engine has no CUDA device"));
    };
    for (side, memory) in [(Side::Source, src), (Side::Destination, dst)] {
        if let MemoryKind::Device { ordinal } = memory
            && ordinal != engine
        {
            return Err(TransferError::DeviceMismatch {
                side,
                layout: ordinal,
                engine,
            });
        }
    }
    if matches!(strategy, Strategy::Kernel | Strategy::Permute)
        && (src == MemoryKind::System || dst == MemoryKind::System)
    {
        return Err(unsupported(
            "kernels cannot reach pageable system memory; use pinned memory",
        ));
    }
    Ok(())
}

/// The batch's copies, with adjacent ranges merged. Pair-major (each pair's layers in
/// turn) when both layouts keep each block's image contiguous (fully contiguous ones, and
/// engine tensors that interleave layers block by block), so consecutive blocks become one
/// run; layer-major otherwise, so consecutive blocks of a layer's slab do. A run's
/// `first_pair` says from which pair on a failure invalidates the batch: its own pair in
/// pair-major order, 0 (every pair) in layer-major order, where every pair's last layer
/// comes at the end.
fn coalesce(
    src: &Layout,
    dst: &Layout,
    pairs: &[(BlockId, BlockId)],
    layers: Range<usize>,
) -> Vec<Run> {
    let outer = src.config().outer_dim;
    let len = src.region_bytes();
    let mut runs: Vec<Run> = Vec::new();
    // `merge`: whether this range may extend the last run when adjacent. A run never
    // crosses from one layer to the next in layer-major order: each layer may be its own
    // allocation (a slab, an engine's tensor), and two allocations that happen to be adjacent
    // in the address space are still two (one copy across both is not a valid copy).
    let mut push = |index: usize, s: u64, d: u64, merge: bool| match runs.last_mut() {
        Some(last)
            if merge && last.src + last.len as u64 == s && last.dst + last.len as u64 == d =>
        {
            last.len += len;
        }
        _ => runs.push(Run {
            src: s,
            dst: d,
            len,
            first_pair: index,
        }),
    };
    let pair_major = src.contiguous_images() && dst.contiguous_images();
    if pair_major {
        // A block's whole image is contiguous on both sides (one allocation holds it).
        for (index, &(a, b)) in pairs.iter().enumerate() {
            for layer in layers.clone() {
                for o in 0..outer {
                    push(
                        index,
                        src.addr(a.index(), layer, o),
                        dst.addr(b.index(), layer, o),
                        true,
                    );
                }
            }
        }
    } else {
        for layer in layers {
            let mut first = true;
            for &(a, b) in pairs {
                for o in 0..outer {
                    push(
                        0,
                        src.addr(a.index(), layer, o),
                        dst.addr(b.index(), layer, o),
                        !std::mem::take(&mut first),
                    );
                }
            }
        }
    }
    runs
}

fn verify_checksums(src: &Layout, pairs: &[(BlockId, BlockId)]) -> Result<(), TransferError> {
    let Some(sums) = src.checksums() else {
        return Ok(());
    };
    for &(block, _) in pairs {
        let expected = sums.lock()[block.index()];
        if let Some(expected) = expected {
            let actual = src.hash_block(block.index());
            if actual != expected {
                return Err(TransferError::ChecksumMismatch {
                    block,
                    expected,
                    actual,
                });
            }
        }
    }
    Ok(())
}

/// Overwrites the destinations of `failed` pairs with garbage, as a copy that died part-way
/// would leave them. The caller holds their write locks.
fn scribble(dst: &Layout, pairs: &[(BlockId, BlockId)], failed: &[usize], layers: Range<usize>) {
    let len = dst.region_bytes();
    for &i in failed {
        let block = pairs[i].1.index();
        for layer in layers.clone() {
            for o in 0..dst.config().outer_dim {
                let addr = dst.addr(block, layer, o);
                // SAFETY: a region of a live host slab (validated ids and layers), under the
                // batch's write lock on this block.
                unsafe { std::ptr::write_bytes(addr as *mut u8, 0xDE, len) };
            }
        }
    }
}

/// The batch's block locks: read on sources, write on destinations; released on drop.
struct BatchLocks {
    src: Arc<Layout>,
    dst: Arc<Layout>,
    reads: Vec<usize>,
    writes: Vec<usize>,
}

impl BatchLocks {
    fn acquire(
        src: &Arc<Layout>,
        dst: &Arc<Layout>,
        pairs: &[(BlockId, BlockId)],
    ) -> Result<Self, TransferError> {
        let mut locks = BatchLocks {
            src: Arc::clone(src),
            dst: Arc::clone(dst),
            reads: Vec::with_capacity(pairs.len()),
            writes: Vec::with_capacity(pairs.len()),
        };
        for (second, &(_, block)) in pairs.iter().enumerate() {
            if !dst.locks().try_write(block.index()) {
                // `locks` drops here, releasing what it holds.
                return Err(
                    match locks.writes.iter().position(|&w| w == block.index()) {
                        Some(first) => TransferError::DuplicateDestination {
                            block,
                            first,
                            second,
                        },
                        None => TransferError::BlockBusy {
                            side: Side::Destination,
                            block,
                        },
                    },
                );
            }
            locks.writes.push(block.index());
        }
        let same = Arc::ptr_eq(src, dst);
        for &(block, _) in pairs {
            if !src.locks().try_read(block.index()) {
                return Err(if same && locks.writes.contains(&block.index()) {
                    TransferError::SourceIsDestination(block)
                } else {
                    TransferError::BlockBusy {
                        side: Side::Source,
                        block,
                    }
                });
            }
            locks.reads.push(block.index());
        }
        Ok(locks)
    }
}

impl Drop for BatchLocks {
    fn drop(&mut self) {
        for &w in &self.writes {
            self.dst.locks().unlock_write(w);
        }
        for &r in &self.reads {
            self.src.locks().unlock_read(r);
        }
    }
}

/// A transfer in flight. [`wait`](Self::wait) for it; dropping it also waits (the blocks
/// stay locked until the copy has landed), logging any error.
#[must_use = "a transfer is complete only once waited for"]
pub struct TransferHandle {
    report: TransferReport,
    /// Held until the copy lands; `None` once finished.
    locks: Option<BatchLocks>,
    event: Option<CudaEvent>,
    /// The pairs whose destination checksums to record on completion (empty when the
    /// destination has none).
    checksum_pairs: Vec<(BlockId, BlockId)>,
    /// Pairs an injected fault failed (sorted).
    injected: Vec<usize>,
    faults: Option<Arc<dyn FaultInjector>>,
}

impl TransferHandle {
    /// What the transfer does.
    pub fn report(&self) -> &TransferReport {
        &self.report
    }

    /// Whether the copy has landed (never blocks).
    pub fn is_complete(&self) -> bool {
        self.event.as_ref().is_none_or(CudaEvent::is_complete)
    }

    /// The event recorded on the copy stream after this transfer's copies: what the
    /// engine's stream waits for (`CudaEvent::wait_on`, or [`CudaEvent::wait_on_raw`])
    /// before its kernels read the destination blocks — no host synchronisation. `None` when nothing runs any more on
    /// the GPU (host copies complete inside [`copy_blocks`](TransferEngine::copy_blocks)).
    /// The event is reference counted: it is not reused for another transfer while a clone
    /// lives, so it may outlive the handle. The blocks stay locked until the handle is
    /// waited for or dropped, whatever the engine does with the event.
    pub fn completion_event(&self) -> Option<CudaEvent> {
        self.event.clone()
    }

    /// Blocks until the copy has landed; returns its report, or the pairs that failed.
    pub fn wait(mut self) -> Result<TransferReport, TransferError> {
        let landed = match self.event.take() {
            Some(event) => event.wait(),
            None => Ok(()),
        };
        self.finish(landed)?;
        Ok(self.report)
    }

    /// Settles a copy that has landed (`Ok`) or whose completion failed (`Err`: every pair
    /// failed); an injected fault turns a landed copy into a partial failure. Does nothing
    /// once settled.
    fn finish(&mut self, landed: Result<(), crate::StorageError>) -> Result<(), TransferError> {
        if self.locks.is_none() {
            return Ok(());
        }
        match landed {
            Ok(()) => {
                let failed = std::mem::take(&mut self.injected);
                self.settle(&failed);
                if failed.is_empty() {
                    Ok(())
                } else {
                    Err(TransferError::CopyFailed {
                        failed,
                        error: "injected fault".into(),
                    })
                }
            }
            Err(error) => {
                let failed: Vec<usize> = (0..self.report.pairs).collect();
                self.settle(&failed);
                Err(TransferError::CopyFailed {
                    failed,
                    error: error.to_string(),
                })
            }
        }
    }

    /// Ends the transfer once nothing of it still runs: records the checksums of the
    /// destinations that landed, forgets those of the `failed` pairs (sorted batch
    /// indices), then releases the locks.
    fn settle(&mut self, failed: &[usize]) {
        let Some(locks) = self.locks.take() else {
            return;
        };
        self.event = None;
        if let Some(sums) = locks.dst.checksums()
            && !self.checksum_pairs.is_empty()
        {
            let fresh: Vec<(usize, Option<u64>)> = self
                .checksum_pairs
                .iter()
                .enumerate()
                .map(|(i, &(_, d))| {
                    if failed.binary_search(&i).is_ok() {
                        return (d.index(), None);
                    }
                    let mut sum = locks.dst.hash_block(d.index());
                    if self.faults.as_ref().is_some_and(|f| f.corrupt_checksum(d)) {
                        sum = !sum;
                    }
                    (d.index(), Some(sum))
                })
                .collect();
            let mut sums = sums.lock();
            for (block, sum) in fresh {
                sums[block] = sum;
            }
        }
        drop(locks);
    }
}

impl Drop for TransferHandle {
    fn drop(&mut self) {
        if self.locks.is_some() {
            let landed = self.event.take().map_or(Ok(()), |event| event.wait());
            if let Err(error) = self.finish(landed) {
                tracing::error!(%error, "transfer dropped unwaited, and its copy failed");
            }
        }
    }
}

impl std::fmt::Debug for TransferHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferHandle")
            .field("report", &self.report)
            .field("complete", &self.is_complete())
            .finish()
    }
}

#[cfg(test)]
#[path = "transfer_tests.rs"]
mod tests;
