//! `kvbm-bench`: how fast is kvbm, and how much cache hit would a given amount of memory and
//! eviction policy give? See `kvbm-bench --help`. The library holds the pieces the binary and
//! its tests share.

pub mod cycle;
pub mod disk;
pub mod remote;
pub mod replay;
pub mod report;
pub mod soak;
pub mod tiered;
pub mod trace;
pub mod transfer;
pub mod workload;

/// Command-line sizes with an upper bound: a value past it would overflow the byte
/// arithmetic (release builds wrap) or ask for more memory than any machine has, so it is
/// refused when the arguments are parsed, with the bound in the message.
pub mod args {
    /// A count or size in `1..=max`.
    fn bounded(s: &str, max: usize) -> Result<usize, String> {
        let v: usize = s
            .trim()
            .parse()
            .map_err(|e| format!("{s:?} is not a whole number: {e}"))?;
        if v == 0 || v > max {
            return Err(format!("{v} is out of range: 1..={max}"));
        }
        Ok(v)
    }

    /// KiB of one block or region: at most 1 GiB.
    pub fn kib(s: &str) -> Result<usize, String> {
        bounded(s, 1 << 20)
    }

    /// MiB of a layout or a measurement: at most 1 TiB.
    pub fn mib(s: &str) -> Result<usize, String> {
        bounded(s, 1 << 20)
    }

    /// Blocks (per request, per transfer, per batch): at most 2^24.
    pub fn blocks(s: &str) -> Result<usize, String> {
        bounded(s, 1 << 24)
    }

    /// Blocks per request, where 0 means "as generated": 2 to 2^16 (a chain of one block
    /// has no parent to share).
    pub fn blocks_per_request(s: &str) -> Result<usize, String> {
        if s.trim() == "0" {
            return Ok(0);
        }
        let n = bounded(s, 1 << 16)?;
        if n < 2 {
            return Err(format!(
                "{n} is out of range: 0 (as generated) or 2..=65536"
            ));
        }
        Ok(n)
    }

    /// Layers per block: at most 1024.
    pub fn layers(s: &str) -> Result<usize, String> {
        bounded(s, 1024)
    }

    /// Threads (request threads, stack workers): at most 1024.
    pub fn threads(s: &str) -> Result<usize, String> {
        bounded(s, 1024)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn sizes_past_their_bound_or_zero_are_refused() {
            assert_eq!(super::kib("32"), Ok(32));
            assert!(super::kib("0").is_err());
            assert!(
                super::kib("18014398509481985")
                    .unwrap_err()
                    .contains("1..=")
            );
            assert!(super::kib("-1").is_err());
            assert!(super::mib("1048577").is_err());
            assert_eq!(super::blocks_per_request("0"), Ok(0));
            assert!(super::blocks_per_request("100000000").is_err());
            assert!(super::blocks_per_request("1").is_err());
            assert!(super::layers("100000").is_err());
            assert!(super::threads("0").is_err());
            assert_eq!(super::blocks("4096"), Ok(4096));
        }
    }
}
