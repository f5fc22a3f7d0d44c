//! Bit-exact model of the datapath's flow hash (src/bpf/jhash.h and the word
//! order of src/bpf/parse.h), so the host and the tests can tell which slot,
//! and so which destination, a flow lands on.

use std::net::Ipv4Addr;

use crate::bpf::consts::L4LB_TABLE_MASK;

const JHASH_INITVAL: u32 = 0xdead_beef;

/// A flow as the datapath hashes it. Ports are 0 for IPv4 fragments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl Flow {
    /// jhash of (source, destination, ports, protocol) with `seed`. The words
    /// are the wire bytes loaded little-endian, as the BPF program loads them.
    pub fn hash(&self, seed: u32) -> u32 {
        let mut ports = [0u8; 4];
        ports[..2].copy_from_slice(&self.sport.to_be_bytes());
        ports[2..].copy_from_slice(&self.dport.to_be_bytes());
        jhash_4words(
            u32::from_le_bytes(self.saddr.octets()),
            u32::from_le_bytes(self.daddr.octets()),
            u32::from_le_bytes(ports),
            u32::from(self.proto),
            seed,
        )
    }

    /// The lookup-table slot of this flow.
    pub fn slot(&self, seed: u32) -> usize {
        (self.hash(seed) & L4LB_TABLE_MASK) as usize
    }
}

fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c); *a ^= c.rotate_left(4); *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a); *b ^= a.rotate_left(6); *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b); *c ^= b.rotate_left(8); *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c); *a ^= c.rotate_left(16); *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a); *b ^= a.rotate_left(19); *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b); *c ^= b.rotate_left(4); *b = b.wrapping_add(*a);
}

fn finish(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b; *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c; *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a; *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b; *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c; *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a; *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b; *c = c.wrapping_sub(b.rotate_left(24));
}

/// The kernel's jhash2() over four words.
pub fn jhash_4words(w0: u32, w1: u32, w2: u32, w3: u32, seed: u32) -> u32 {
    let init = JHASH_INITVAL.wrapping_add(4 << 2).wrapping_add(seed);
    let (mut a, mut b, mut c) = (init, init, init);
    a = a.wrapping_add(w0);
    b = b.wrapping_add(w1);
    c = c.wrapping_add(w2);
    mix(&mut a, &mut b, &mut c);
    a = a.wrapping_add(w3);
    finish(&mut a, &mut b, &mut c);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values of the kernel's jhash2(k, 4, initval), computed with
    /// the C code of include/linux/jhash.h.
    #[test]
    fn matches_kernel_jhash2() {
        assert_eq!(jhash_4words(1, 2, 3, 4, 0), JHASH2_1234_SEED0);
        assert_eq!(jhash_4words(0, 0, 0, 0, 0xabcd_ef01), JHASH2_0000_SEEDABCDEF01);
    }

    #[test]
    fn slot_is_in_table() {
        let flow = Flow {
            saddr: Ipv4Addr::new(192, 0, 2, 1),
            daddr: Ipv4Addr::new(198, 51, 100, 1),
            sport: 40000,
            dport: 80,
            proto: 6,
        };
        assert!(flow.slot(7) < crate::bpf::TABLE_SIZE);
        assert_ne!(flow.hash(1), flow.hash(2), "the seed changes the hash");
    }

    const JHASH2_1234_SEED0: u32 = 0x6649_1246;
    const JHASH2_0000_SEEDABCDEF01: u32 = 0xb9df_2102;
}
