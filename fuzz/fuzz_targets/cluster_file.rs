//! The cluster file parser on arbitrary text: a configuration or an error
//! naming the line and field, never a panic.
#![no_main]

use falcon::config::ClusterConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cfg) = ClusterConfig::parse(std::path::Path::new("/fuzz/cluster.toml"), text) {
            let _ = cfg.choose_node(Some(1));
            let _ = cfg.shm_dir();
        }
    }
});
