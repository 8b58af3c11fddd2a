//! Governance test fixture: a host that declares what it is, for
//! `check-plugin PLUGIN --exe HOST`.

hotpatch_plugin_api::declare_host!(api = "1.3.0", shared = env!("HOTPATCH_SHARED"));

fn main() {
    println!("gov-host with gov-shared {}", gov_shared::VERSION);
}
