//! Fuzzes the DNS bytes faultline takes from the network: the header and question parser.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(m) = probe_user::dns::parse(data) {
        // What the parser returns is always usable for the report.
        let _ = (probe_user::dns::rcode_name(m.rcode), probe_user::dns::qtype_name(m.qtype), m.qname.len());
    }
});
