//! The public CPU API on structured input: layouts, configurations, inputs of every dtype.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|case: tpo_fuzz::api::Case| {
    if let Err(e) = tpo_fuzz::api::run(&case) {
        tpo_fuzz::fail(&e, &case);
    }
});
