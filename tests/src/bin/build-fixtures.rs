//! Builds every fixture plugin, binary and example the integration tests
//! use, once, the way the tests build them (`fixtures::build_all`).
//! `scripts/test.sh` runs it on the quiet machine before the suite, so no
//! test compiles under the CPU hog of `scripts/with-load.sh`.

fn main() {
    let t = std::time::Instant::now();
    hotpatch_tests::fixtures::build_all();
    eprintln!("build-fixtures: all fixtures fresh in {:.1?}", t.elapsed());
}
