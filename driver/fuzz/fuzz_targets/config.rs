//! The claim configuration parser and validator on arbitrary bytes: never a panic, and anything
//! accepted survives a round trip through JSON and merging.
#![no_main]

#[path = "../../src/model/config.rs"]
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
    // Every accepted sysctl key names one file directly below its interface's `conf` directory.
    for key in parsed.sysctls.iter().flat_map(|s| s.keys()) {
        let dir = std::path::Path::new("/proc/sys/net")
            .join(key.family().dir())
            .join("conf")
            .join(key.interface());
        let file = dir.join(key.setting());
        assert!(
            file.components()
                .skip(1)
                .all(|c| matches!(c, std::path::Component::Normal(_))),
            "{key} leaves its directory"
        );
        assert_eq!(file.components().count(), 8, "{key}");
        assert_eq!(file.parent(), Some(dir.as_path()), "{key}");
    }
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
