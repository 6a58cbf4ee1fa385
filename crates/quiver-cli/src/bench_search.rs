//! `quiver bench search` (being built: issue 7).

use anyhow::{bail, Result};

use crate::args::BenchSearchArgs;

pub fn run(_db: &std::path::Path, _args: BenchSearchArgs, _json: bool) -> Result<()> {
    bail!("search benchmark is not available yet")
}
