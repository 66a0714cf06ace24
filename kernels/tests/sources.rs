//! Checks on the CUDA sources themselves, without a compiler: properties that the PTX test
//! cannot see and a GPU test cannot reach (they need more than 2^32 regions).

use kvbm_kernels::SOURCES;

/// The `for (...)` headers of a source (what lies between the loop's balanced parentheses).
fn loop_headers(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("for (") {
        let header = &rest[at + "for (".len()..];
        let mut depth = 1;
        let end = header
            .char_indices()
            .find(|&(_, c)| {
                depth += match c {
                    '(' => 1,
                    ')' => -1,
                    _ => 0,
                };
                depth == 0
            })
            .map_or(header.len(), |(i, _)| i);
        out.push(header[..end].to_owned());
        rest = &header[end..];
    }
    out
}

#[test]
fn every_grid_stride_loop_index_is_64_bit() {
    let mut checked = 0;
    for source in SOURCES {
        for header in loop_headers(&source.full_source()) {
            if !header.contains("gridDim") {
                continue;
            }
            checked += 1;
            let init = header.split(';').next().unwrap().trim();
            assert!(
                init.starts_with("unsigned long long "),
                "{}: the grid-stride loop `for ({header})` indexes with a narrower type than 64 \
                 bits; it wraps once the count nears the type's range",
                source.name
            );
        }
    }
    // batched_copy's region loop and chunk loop, and each permute kernel's item loop and
    // chunk loop.
    assert!(checked >= 6, "only {checked} grid-stride loops found");
}
