//! Writes a copy of a GGUF file with only some quantised tensors widened to
//! f16, to measure which tensors the answers depend on (docs/local.md):
//!
//!   variant SRC.gguf DST.gguf attn_,ffn_,token_embd
//!
//! widens every tensor whose name contains one of the comma-separated parts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let (src, dst, parts) = (&a[0], &a[1], &a[2]);
    let parts: Vec<&str> = parts.split(',').collect();
    switchyard_local::convert::convert_selected(
        std::path::Path::new(src),
        std::path::Path::new(dst),
        &|name| parts.iter().any(|p| name.contains(p)),
    )
    .expect("writing the copy");
}
