//! Every decoder of a value (or key) read from etcd under a job's prefix: the epoch, a
//! checkpoint, a slot holder, a node record, a key. Garbage must give an error, never a panic;
//! what decodes must re-encode to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use taskgraph::testing::etcd::keys::{EpochValue, Holder, JobKeys, NodeRecord, StoredCheckpoint};

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = EpochValue::parse(data) {
        assert_eq!(EpochValue::parse(v.encode().as_bytes()), Ok(v));
    }
    if let Ok(c) = StoredCheckpoint::decode(data) {
        assert_eq!(c.encode(), data);
    }
    let _ = serde_json::from_slice::<Holder>(data);
    let _ = serde_json::from_slice::<NodeRecord>(data);
    let keys = JobKeys::new("fuzz");
    let mut key = keys.prefix().as_bytes().to_vec();
    key.extend_from_slice(data);
    let _ = keys.parse(&key);
    let _ = keys.parse(data);
});
