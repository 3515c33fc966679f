//! Policy YAML comes from users and from the API server: parsing must never panic, every
//! diagnostic must point inside the input, and an accepted policy must survive a round trip
//! through its own YAML.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (policies, diags) = signet_policy::parse::parse_str(Path::new("fuzz.yaml"), text);
    // YAML breaks lines at LF, CRLF and a lone CR; an error at end of input may sit one past.
    let breaks = text.matches('\n').count() + text.matches('\r').count() - text.matches("\r\n").count();
    let lines = breaks + 2;
    for d in &diags {
        assert!(d.pos.line <= lines, "diagnostic outside the input: {d}");
        assert!(!d.message.is_empty());
    }
    for p in policies {
        let yaml = serde_yaml::to_string(&p.resource).expect("a parsed policy serialises");
        let (again, d) = signet_policy::parse::parse_str(Path::new("again.yaml"), &yaml);
        assert!(d.is_empty(), "re-parsing a parsed policy failed: {d:?}\n{yaml}");
        assert_eq!(again.len(), 1);
        let twice = serde_yaml::to_string(&again[0].resource).expect("serialises");
        assert_eq!(twice, yaml, "round trip changed the policy");
    }
});
