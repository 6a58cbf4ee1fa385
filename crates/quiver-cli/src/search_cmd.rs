//! `quiver search` (being built: issue 7).

use anyhow::{bail, Result};
use quiver_store::Store;

use crate::args::SearchArgs;

pub fn run(_store: &Store, _args: SearchArgs, _json: bool) -> Result<()> {
    bail!("search is not available yet")
}
