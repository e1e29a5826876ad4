//! The job spec stored in etcd (`spec`): garbage gives an error, never a panic; a spec that
//! decodes re-encodes to one that decodes to the same, and differs from nothing in itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use taskgraph::JobSpec;

fuzz_target!(|data: &[u8]| {
    if let Ok(spec) = JobSpec::decode(data) {
        let again = JobSpec::decode(spec.encode().as_bytes()).expect("a re-encoded spec decodes");
        assert_eq!(again, spec);
        assert_eq!(JobSpec::difference(&spec, &again), None);
    }
});
