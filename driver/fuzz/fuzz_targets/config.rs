//! The claim configuration parser and validator on arbitrary bytes: never a panic, and anything
//! accepted survives a round trip through JSON and merging.
#![no_main]

#[path = "../../src/config.rs"]
#[allow(dead_code, reason = "the target uses part of the module")]
mod config;

use config::DeviceLimits;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(parsed) = config::parse(data) else {
        return;
    };
    let valid = parsed
        .validate(DeviceLimits {
            max_mtu: Some(9216),
        })
        .is_ok();
    let text = serde_json::to_vec(&parsed).expect("a parsed config serializes");
    let again = config::parse(&text).expect("a serialized config parses again");
    assert_eq!(again, parsed);
    let merged = config::default_config().merge(parsed.clone());
    if valid {
        assert!(
            merged
                .validate(DeviceLimits {
                    max_mtu: Some(9216)
                })
                .is_ok()
        );
    }
});
