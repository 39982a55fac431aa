//! `tpo eval`'s input reader, compiled from the CLI's own sources: the CLI is a binary, not a
//! library, so this is how a fuzz target calls the very function `tpo eval` calls
//! (`input::load`). Only the reader and the tensor decoding it uses are compiled here, not the
//! rest of the CLI (arguments, output files). Paths are relative to this file's directory.
#![allow(dead_code, unused_imports, clippy::all)]

#[path = "../../src/cli/tensors.rs"]
pub mod tensors;

#[path = "../../src/cli/input.rs"]
pub mod input;
