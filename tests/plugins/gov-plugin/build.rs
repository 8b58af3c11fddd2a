//! Records the resolved version of the shared crate from the lock file.

fn main() {
    hotpatch_plugin_api::build::record_shared(&["gov-shared"]);
}
