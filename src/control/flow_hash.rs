//! Bit-exact model of the datapath's flow hash (src/bpf/jhash.h and the word
//! order of src/bpf/parse.h, spec steps 4 and 5) and of its VIP lookup's home
//! entry (step 2), so the host and the tests can tell which slot, and so which
//! backend, a flow lands on, and where a VIP sits in l4lb_vips.

use std::net::IpAddr;

use crate::bpf::{VIP_BITS, VIP_HASH_MUL};

const JHASH_INITVAL: u32 = 0xdead_beef;

/// A flow as the datapath hashes it. The ports are the ones the datapath
/// hashes: 0 for fragments, and 0 for UDP to a service without hash_ports.
/// Source and destination are of the same family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub saddr: IpAddr,
    pub daddr: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// An address as one hash word: IPv4 = its 4 octets loaded little-endian;
/// IPv6 = the XOR of its four little-endian 32-bit words.
pub fn addr_word(addr: IpAddr) -> u32 {
    match addr {
        IpAddr::V4(a) => u32::from_le_bytes(a.octets()),
        IpAddr::V6(a) => a
            .octets()
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes")))
            .fold(0, |acc, w| acc ^ w),
    }
}

impl Flow {
    /// jhash_3words of (source, destination, ports) with initval seed +
    /// protocol. The words are the wire bytes loaded little-endian, as the
    /// BPF program loads them.
    pub fn hash(&self, seed: u32) -> u32 {
        let mut ports = [0u8; 4];
        ports[..2].copy_from_slice(&self.sport.to_be_bytes());
        ports[2..].copy_from_slice(&self.dport.to_be_bytes());
        jhash_3words(
            addr_word(self.saddr),
            addr_word(self.daddr),
            u32::from_le_bytes(ports),
            seed.wrapping_add(u32::from(self.proto)),
        )
    }

    /// The slot of this flow in a service's Maglev table (MAGLEV_SIZE slots).
    pub fn slot(&self, seed: u32) -> usize {
        crate::maglev::flow_slot(self, seed, crate::bpf::MAGLEV_SIZE)
    }
}

/// A hash mapped onto `size` slots the way the datapath does it: the high
/// 32 bits of hash x size (a multiply and a shift, no division).
pub fn scale(hash: u32, size: usize) -> usize {
    ((u64::from(hash) * size as u64) >> 32) as usize
}

/// The home entry in l4lb_vips of a VIP key (the 20 key bytes of struct
/// l4lb_vip_key: address, family, protocol, port in network order): the XOR
/// of its five little-endian words, times L4LB_VIP_HASH_MUL (wrapping), top
/// L4LB_VIP_BITS bits.
pub fn vip_home(key: &[u8; 20]) -> u32 {
    let fold =
        key.chunks_exact(4).map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes"))).fold(0, |acc, w| acc ^ w);
    fold.wrapping_mul(VIP_HASH_MUL) >> (32 - VIP_BITS)
}

fn finish(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

/// The kernel's jhash_3words(): one final mix, no mixing round.
pub fn jhash_3words(w0: u32, w1: u32, w2: u32, initval: u32) -> u32 {
    let init = JHASH_INITVAL.wrapping_add(3 << 2).wrapping_add(initval);
    let (mut a, mut b, mut c) = (init.wrapping_add(w0), init.wrapping_add(w1), init.wrapping_add(w2));
    finish(&mut a, &mut b, &mut c);
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
        *a = a.wrapping_sub(*c);
        *a ^= c.rotate_left(4);
        *c = c.wrapping_add(*b);
        *b = b.wrapping_sub(*a);
        *b ^= a.rotate_left(6);
        *a = a.wrapping_add(*c);
        *c = c.wrapping_sub(*b);
        *c ^= b.rotate_left(8);
        *b = b.wrapping_add(*a);
        *a = a.wrapping_sub(*c);
        *a ^= c.rotate_left(16);
        *c = c.wrapping_add(*b);
        *b = b.wrapping_sub(*a);
        *b ^= a.rotate_left(19);
        *a = a.wrapping_add(*c);
        *c = c.wrapping_sub(*b);
        *c ^= b.rotate_left(4);
        *b = b.wrapping_add(*a);
    }

    /// The kernel's jhash2() over four words: not the flow hash any more, kept
    /// here because the kernel's reference values of it check finish(), which
    /// jhash_3words shares.
    fn jhash_4words(w0: u32, w1: u32, w2: u32, w3: u32, seed: u32) -> u32 {
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

    /// Reference values of the kernel's jhash2(k, 4, initval), computed with
    /// the C code of include/linux/jhash.h.
    #[test]
    fn matches_kernel_jhash2() {
        assert_eq!(jhash_4words(1, 2, 3, 4, 0), JHASH2_1234_SEED0);
        assert_eq!(jhash_4words(0, 0, 0, 0, 0xabcd_ef01), JHASH2_0000_SEEDABCDEF01);
    }

    /// Reference values of the kernel's jhash_3words(a, b, c, initval),
    /// computed with the C code of src/bpf/jhash.h (the kernel's lookup3).
    #[test]
    fn matches_kernel_jhash_3words() {
        assert_eq!(jhash_3words(1, 2, 3, 0), 0xa461_58f5);
        assert_eq!(jhash_3words(0, 0, 0, 0xabcd_ef01), 0x0a1c_9e3f);
    }

    #[test]
    fn slot_is_in_table() {
        let flow = Flow {
            saddr: Ipv4Addr::new(192, 0, 2, 1).into(),
            daddr: Ipv4Addr::new(198, 51, 100, 1).into(),
            sport: 40000,
            dport: 80,
            proto: 6,
        };
        assert!(flow.slot(7) < crate::bpf::MAGLEV_SIZE);
        assert_ne!(flow.hash(1), flow.hash(2), "the seed changes the hash");
        assert_eq!(flow.slot(7), scale(flow.hash(7), crate::bpf::MAGLEV_SIZE));
    }

    #[test]
    fn words_of_addresses() {
        assert_eq!(addr_word(Ipv4Addr::new(1, 2, 3, 4).into()), 0x0403_0201);
        let v6: Ipv6Addr = "102:304:506:708:90a:b0c:d0e:f10".parse().unwrap();
        assert_eq!(addr_word(v6.into()), 0x0403_0201 ^ 0x0807_0605 ^ 0x0c0b_0a09 ^ 0x100f_0e0d);
        // An IPv6 flow hashes its folded words like an IPv4 flow with those words.
        let flow6 = Flow { saddr: v6.into(), daddr: "2001:db8::10".parse().unwrap(), sport: 1, dport: 443, proto: 6 };
        let d = addr_word(flow6.daddr);
        let flow4 = Flow {
            saddr: Ipv4Addr::from(addr_word(v6.into()).to_le_bytes()).into(),
            daddr: Ipv4Addr::from(d.to_le_bytes()).into(),
            ..flow6
        };
        assert_eq!(flow6.hash(9), flow4.hash(9));
    }

    #[test]
    fn scaling_covers_the_range_without_division() {
        assert_eq!(scale(0, 51203), 0);
        assert_eq!(scale(u32::MAX, 51203), 51202);
        assert_eq!(scale(1 << 31, 51203), 25601);
    }

    #[test]
    fn vip_home_folds_five_words() {
        let mut key = [0u8; 20];
        assert_eq!(vip_home(&key), 0);
        key[16] = 4; // family; fold = 4, 4 * 0x9e3779b1 = 0x278dde6c4 -> 0x78dde6c4 >> 22
        assert_eq!(vip_home(&key), 0x78dd_e6c4 >> 22);
        // 203.0.113.10:80/tcp
        let mut web = [0u8; 20];
        web[..4].copy_from_slice(&[203, 0, 113, 10]);
        web[16] = 4;
        web[17] = 6;
        web[18..].copy_from_slice(&80u16.to_be_bytes());
        let fold = u32::from_le_bytes([203, 0, 113, 10]) ^ u32::from_le_bytes([4, 6, 0, 80]);
        assert_eq!(vip_home(&web), fold.wrapping_mul(0x9e37_79b1) >> 22);
        assert!(vip_home(&web) < 1024);
    }

    const JHASH2_1234_SEED0: u32 = 0x6649_1246;
    const JHASH2_0000_SEEDABCDEF01: u32 = 0xb9df_2102;
}
