mod skel {
    include!(concat!(env!("OUT_DIR"), "/l4lb_xdp.skel.rs"));
}
fn main() {}
