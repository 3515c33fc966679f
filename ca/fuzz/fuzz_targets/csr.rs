//! CSR parsing sees bytes from any authenticated node: it must never panic, and a CSR it
//! accepts must carry a public key the signer can put into a certificate.
#![no_main]

use libfuzzer_sys::fuzz_target;
use signet_ca::Csr;

fuzz_target!(|data: &[u8]| {
    if let Ok(csr) = Csr::parse(data) {
        rcgen::SubjectPublicKeyInfo::from_der(csr.public_key_der())
            .expect("an accepted CSR's key must be encodable into an SVID");
    }
});
