//! The rejection a peer returns in a gRPC status (binary metadata, decoded by
//! `Rejection::from_status`): any bytes, any code, any message — `None` or a rejection, never a
//! panic; a decoded rejection survives its own round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use taskgraph::testing::wire::{Rejection, REJECTION_METADATA_KEY};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

fuzz_target!(|data: &[u8]| {
    let Some((&code, rest)) = data.split_first() else {
        return;
    };
    let mut metadata = MetadataMap::new();
    metadata.insert_bin(REJECTION_METADATA_KEY, MetadataValue::from_bytes(rest));
    let status = Status::with_metadata(
        Code::from_i32(i32::from(code % 20)),
        String::from_utf8_lossy(rest),
        metadata,
    );
    if let Some(r) = Rejection::from_status(&status) {
        let back = Rejection::from_status(&Status::from(r.clone()));
        assert!(back.is_some(), "{r:?} does not survive its round trip");
        let _ = (r.code(), r.retryable(), r.to_string());
    }
});
