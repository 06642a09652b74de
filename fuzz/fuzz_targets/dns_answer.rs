//! An upstream's answer to an allowed query, as the DNS proxy handles it:
//! parse -> does it answer the question -> CNAME chain, learned addresses,
//! rebinding filter, TTL clamp -> the reply to the client (`message::release`,
//! which the proxy calls: truncated past the client's UDP limit, or whole
//! over TCP).
#![no_main]
use std::sync::OnceLock;

use enforcer::dns::{message, DnsPolicy};
use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;

fn setup() -> &'static (DnsPolicy, message::Query) {
    static P: OnceLock<(DnsPolicy, message::Query)> = OnceLock::new();
    P.get_or_init(|| {
        let text = include_str!("../seeds/policy.yaml");
        let ps = enforcer::policy::parse_str(text, std::path::Path::new("seed.yaml"))
            .expect("seed policy");
        let c = enforcer::policy::compile::compile(&ps[0]).expect("seed policy compiles");
        let p = enforcer::dns::compile_dns(&ps[0], &c);
        // "allowed.example.com" A, id 0x1234, RD.
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["allowed", "example", "com"] {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        let q = message::parse_query(&q).expect("seed query");
        (p, q)
    })
}

fuzz_target!(|data: &[u8]| {
    let (policy, q) = setup();
    let Ok(resp) = Message::from_vec(data) else {
        return;
    };
    if !message::answers_question(q, &resp) {
        return;
    }
    // As the proxy's `finish`: over UDP (the client's limit) and over TCP.
    for limit in [Some(q.udp_limit()), None] {
        let view = policy.rules(false);
        let _ = message::release(policy, view.cidrs, q, resp.clone(), true, limit);
    }
});
