//! Reading an operator's input file (destination list, configuration) with
//! the checks every such file gets before it is parsed.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// The bytes of `path`, refused when it is not a regular file or is larger
/// than `limit`; `kind` names the file in the error ("destination file").
pub fn read_limited(path: &Path, limit: u64, kind: &str) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if !meta.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    if meta.len() > limit {
        bail!("{}: {} bytes is too large for a {kind} (limit {limit})", path.display(), meta.len());
    }
    std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))
}
