//! SPIFFE ID parsing must never panic, and whatever it accepts must print back to exactly the
//! input and parse again to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use signet_ca::{SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(id) = SpiffeId::parse(s) {
        assert_eq!(id.to_string(), s);
        assert_eq!(SpiffeId::parse(id.as_str()).as_ref(), Ok(&id));
        assert!(id.as_str().len() <= signet_ca::spiffe::MAX_SPIFFE_ID_BYTES);
        let td = id.trust_domain();
        assert!(id.is_member_of(&td));
        assert_eq!(format!("{}{}", td.id_string(), id.path()), s);
        for segment in id.segments() {
            assert!(!segment.is_empty() && segment != "." && segment != "..");
        }
        let _ = id.namespace_and_service_account();
    }
    if let Ok(td) = TrustDomain::parse(s) {
        assert!(td.as_str().bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')));
    }
});
