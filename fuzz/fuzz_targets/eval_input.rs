//! `tpo eval`'s reading of a safetensors file into a batch, and the reference on that batch.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = tpo_fuzz::eval_input::run(data) {
        tpo_fuzz::fail(&e, &data.len());
    }
});
