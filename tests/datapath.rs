mod common;
fn main() {
    common::run_suite("offload_subset", "placeholder", vec![]);
}
