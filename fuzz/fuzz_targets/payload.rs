//! Typed payloads (`taskgraph::decode`, postcard) as a task decodes a peer's answer or request:
//! any bytes give a value or an error, never a panic or an unbounded allocation.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = taskgraph::decode::<u64>(data);
    let _ = taskgraph::decode::<String>(data);
    let _ = taskgraph::decode::<Vec<f64>>(data);
    let _ = taskgraph::decode::<(u32, Vec<u8>, Option<i64>)>(data);
    if let Ok(m) = taskgraph::decode::<BTreeMap<String, Vec<u64>>>(data) {
        let bytes = taskgraph::encode(&m).expect("a decoded map encodes");
        assert_eq!(
            taskgraph::decode::<BTreeMap<String, Vec<u64>>>(&bytes),
            Ok(m)
        );
    }
});
