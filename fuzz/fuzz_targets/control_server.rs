//! A live control server fed arbitrary bytes; see `ft_common::control::fuzzing::server`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ft_common::control::fuzzing::server(data);
});
