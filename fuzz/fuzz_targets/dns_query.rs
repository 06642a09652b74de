//! One client message to the DNS proxy: parse -> decision -> the forwarded
//! query or the refusal built for it.
#![no_main]
use std::{sync::OnceLock, time::Instant};

use enforcer::dns::{message, DnsPolicy};
use libfuzzer_sys::fuzz_target;

fn policy() -> &'static DnsPolicy {
    static P: OnceLock<DnsPolicy> = OnceLock::new();
    P.get_or_init(|| {
        let text = include_str!("../seeds/policy.yaml");
        let ps = enforcer::policy::parse_str(text, std::path::Path::new("seed.yaml"))
            .expect("seed policy");
        let c = enforcer::policy::compile::compile(&ps[0]).expect("seed policy compiles");
        enforcer::dns::compile_dns(&ps[0], &c)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some(q) = message::parse_query(data) else {
        return;
    };
    let mut budget = message::Budget::new(Instant::now());
    for tainted in [false, true] {
        let d = message::decide(policy(), tainted, &q, &mut budget, Instant::now());
        if d.verdict == enforcer::events::Verdict::Allow {
            let _ = message::upstream_query(&q);
        } else {
            let _ = message::error_reply(&q, hickory_proto::op::ResponseCode::Refused);
        }
    }
});
