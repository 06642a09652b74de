//! An `AgentPolicy` object's `spec` as the API server hands it to the
//! daemon (JSON): the file validator over its YAML rendering, the namespace
//! and SPIFFE rules of objects, then the compiler.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Ok(p) = enforcer::k8s::crd::object_policy("agents", "research", &spec, "cluster.local")
    else {
        return;
    };
    if let Ok(c) = enforcer::policy::compile::compile(&p) {
        let _ = enforcer::dns::compile_dns(&p, &c);
    }
});
