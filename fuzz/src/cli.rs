//! `tpo eval`'s input reader, compiled from the CLI's own sources: the CLI is a binary, not a
//! library, so this is how a fuzz target calls the very function `tpo eval` calls
//! (`eval::load`). Paths are relative to this file's directory.
#![allow(dead_code, unused_imports, clippy::all)]

#[path = "../../src/cli/tensors.rs"]
pub mod tensors;

#[path = "../../src/cli/eval.rs"]
pub mod eval;
