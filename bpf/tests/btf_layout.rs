//! The Rust mirrors must have the sizes the compiled objects' BTF gives the C structs, so C and
//! Rust cannot drift apart silently.

use std::collections::BTreeMap;

use object::{Object as _, ObjectSection as _};
use signet_bpf::maps::*;

/// Struct name -> (size, member count) from a raw `.BTF` section.
fn btf_structs(btf: &[u8]) -> BTreeMap<String, (u32, u32)> {
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    assert_eq!(u16::from_le_bytes([btf[0], btf[1]]), 0xeb9f, "BTF magic");
    let hdr_len = u32_at(btf, 4) as usize;
    let (type_off, type_len) = (u32_at(btf, 8) as usize, u32_at(btf, 12) as usize);
    let str_off = u32_at(btf, 16) as usize;
    let types = &btf[hdr_len + type_off..hdr_len + type_off + type_len];
    let strings = &btf[hdr_len + str_off..];
    let name = |off: u32| {
        let s = &strings[off as usize..];
        String::from_utf8_lossy(&s[..s.iter().position(|&c| c == 0).unwrap_or(s.len())])
            .into_owned()
    };
    let mut out = BTreeMap::new();
    let mut at = 0;
    while at + 12 <= types.len() {
        let (name_off, info, size) = (
            u32_at(types, at),
            u32_at(types, at + 4),
            u32_at(types, at + 8),
        );
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        at += 12;
        at += match kind {
            1 | 14 | 17 => 4, // INT, VAR, DECL_TAG
            3 => 12,          // ARRAY
            4 | 5 => {
                out.insert(name(name_off), (size, vlen as u32));
                vlen * 12 // STRUCT, UNION
            }
            6 | 13 => vlen * 8,   // ENUM, FUNC_PROTO
            15 | 19 => vlen * 12, // DATASEC, ENUM64
            _ => 0,               // PTR, FWD, TYPEDEF, qualifiers, FUNC, FLOAT, TYPE_TAG
        };
    }
    out
}

#[test]
fn mirrors_match_the_btf_of_every_object() {
    let expected: [(&str, usize, u32); 11] = [
        ("ipcache_key", size_of::<IpcacheKey>(), 2),
        ("ipcache_value", size_of::<IpcacheValue>(), 2),
        ("endpoint_value", size_of::<EndpointValue>(), 4),
        ("policy_key", size_of::<PolicyKey>(), 5),
        ("policy_value", size_of::<PolicyValue>(), 3),
        ("orig_dst", size_of::<OrigDst>(), 4),
        ("client_key", size_of::<ClientKey>(), 3),
        ("config", size_of::<Config>(), 7),
        ("flow_event", size_of::<FlowEvent>(), 13),
        ("ct_key", size_of::<CtKey>(), 6),
        ("frag_key", size_of::<FragKey>(), 5),
    ];
    let mut seen = BTreeMap::new();
    for obj in signet_bpf::OBJECTS {
        let file = object::File::parse(obj.bytes).expect("ELF");
        let btf = file
            .section_by_name(".BTF")
            .expect("objects are built with -g")
            .data()
            .expect("data");
        for (name, (size, members)) in btf_structs(btf) {
            seen.insert(name, (size, members));
        }
    }
    for (name, size, members) in expected {
        let (btf_size, btf_members) = seen
            .get(name)
            .unwrap_or_else(|| panic!("struct {name} not in any object's BTF"));
        assert_eq!(
            *btf_size as usize, size,
            "size of struct {name}: C {btf_size}, Rust {size}"
        );
        assert_eq!(*btf_members, members, "member count of struct {name}");
    }
}
