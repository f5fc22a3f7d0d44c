//! Per-service lookup tables filled with Maglev's permutation method
//! (Eisenbud et al., NSDI 2016), with proportional weights. Pure functions:
//! nothing here touches a map; the caller turns table values (indices into
//! its backend list) into backend numbers and writes only what `diff` returns.
//!
//! # Table size and memory
//!
//! A table has [`TABLE_SIZE`] = 51,203 slots: the smallest prime at least
//! 100 x [`MAX_BACKENDS_PER_SERVICE`] (512), so that even a full service gets
//! about 100 slots per backend and Maglev's imbalance stays near 1%. Each slot
//! is a 4-byte backend number, so a service's table costs 51,203 x 4 =
//! 204,812 bytes (200 KiB) of map values, plus the kernel's per-map overhead
//! (an array map has no per-entry overhead beyond the value). 100 services
//! cost about 20 MiB. The datapath maps a flow to `(hash * TABLE_SIZE) >> 32`
//! (see [`flow_slot`]): a multiply and a shift, as uniform as a modulo.
//!
//! # Method
//!
//! Each backend is known by identity bytes (its address, IPv4 or IPv6: the
//! same on every balancer). Two independent SipHash-2-4 hashes of those bytes,
//! with fixed keys, give `offset = h1 % M` and `skip = h2 % (M - 1) + 1`;
//! since M is prime, `(offset + j * skip) % M` for j = 0..M is a permutation
//! of the slots: the backend's preference list.
//!
//! Backends are sorted by identity, then filled in rounds. Each round every
//! backend with weight w adds w to its credit (which starts at W / 2); when
//! its credit reaches the largest weight W it spends W and takes its next
//! preferred free slot. So the heaviest backends take a slot every round and
//! a backend of weight w takes one every W / w rounds: after R rounds it
//! holds round(R * w / W) slots, proportional to the weights over the whole
//! table (not only in the first round), to within about one slot. A weight
//! so small against W that it earns no whole slot before the table is full
//! gets no slots.
//!
//! # Determinism
//!
//! The table is a function of the set of (identity, weight) pairs and the
//! size only: input order does not matter (backends are sorted by identity,
//! and identities must be unique), nor does any earlier table. So balancers
//! started separately with the same configuration fill the same table and,
//! with the same flow-hash seed, send every flow to the same backend, which
//! is what lets several of them sit behind ECMP. Changing the hash keys below
//! reshuffles every table: all balancers of a fleet must agree on them.
//!
//! # Draining
//!
//! Weight 0 means draining: the backend gets no slots, so it receives no new
//! selections. Connections are not tracked yet, so draining also moves the
//! flows it was serving (exactly as removing it would: the table is the same).

use std::fmt;
use std::net::IpAddr;

use crate::flow_hash::Flow;

/// The product's backend limit per service.
pub const MAX_BACKENDS_PER_SERVICE: usize = 512;

/// Slots per service table: the smallest prime >= 100 x
/// MAX_BACKENDS_PER_SERVICE, i.e. 51,203. At 4 bytes per slot a table costs
/// 204,812 bytes (200 KiB) of map memory per service.
pub const TABLE_SIZE: usize = next_prime(100 * MAX_BACKENDS_PER_SERVICE);

/// A slot that leads to no backend (no backend, or every weight 0). Same
/// value as the datapath's L4LB_SLOT_EMPTY.
pub const EMPTY: u32 = crate::bpf::SLOT_EMPTY;

const _: () = assert!(TABLE_SIZE == crate::bpf::MAGLEV_SIZE, "maglev::TABLE_SIZE differs from L4LB_MAGLEV_SIZE");

/// SipHash keys of the offset and skip hashes (ASCII "l4lb-maglev-offs",
/// "l4lb-maglev-skip"). Part of the table's definition: see Determinism.
const OFFSET_KEY: (u64, u64) = (u64::from_le_bytes(*b"l4lb-mag"), u64::from_le_bytes(*b"lev-offs"));
const SKIP_KEY: (u64, u64) = (u64::from_le_bytes(*b"l4lb-mag"), u64::from_le_bytes(*b"lev-skip"));

/// A backend as the table sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Bytes that name the backend the same way on every balancer.
    pub id: Vec<u8>,
    /// Relative share of new flows; 0 = draining.
    pub weight: u32,
}

impl Backend {
    /// A backend known by its address: 4 bytes for IPv4, 16 for IPv6.
    pub fn from_addr(addr: IpAddr, weight: u32) -> Self {
        let id = match addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        Backend { id, weight }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    SizeNotPrime(usize),
    TooManyBackends(usize),
    DuplicateBackend(Vec<u8>),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::SizeNotPrime(size) => write!(f, "table size {size} is not a prime below 2^32"),
            Error::TooManyBackends(n) => {
                write!(f, "{n} backends: at most {MAX_BACKENDS_PER_SERVICE} per service")
            }
            Error::DuplicateBackend(id) => write!(f, "backend {id:02x?} is listed twice"),
        }
    }
}

impl std::error::Error for Error {}

/// Fills a table of `size` slots (a prime; [`TABLE_SIZE`] in production).
/// Each value is an index into `backends`, or [`EMPTY`] when no backend has
/// a weight above 0.
pub fn populate(backends: &[Backend], size: usize) -> Result<Vec<u32>, Error> {
    if size > u32::MAX as usize || !is_prime(size) {
        return Err(Error::SizeNotPrime(size));
    }
    if backends.len() > MAX_BACKENDS_PER_SERVICE {
        return Err(Error::TooManyBackends(backends.len()));
    }
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by(|&a, &b| backends[a].id.cmp(&backends[b].id));
    if let Some(pair) = order.windows(2).find(|p| backends[p[0]].id == backends[p[1]].id) {
        return Err(Error::DuplicateBackend(backends[pair[0]].id.clone()));
    }

    let mut table = vec![EMPTY; size];
    let max_weight = backends.iter().map(|b| u64::from(b.weight)).max().unwrap_or(0);
    if max_weight == 0 {
        return Ok(table);
    }
    let m = size as u64;
    struct Filler {
        index: u32,
        weight: u64,
        credit: u64,
        next: u64,
        skip: u64,
    }
    let mut fillers: Vec<Filler> = order
        .into_iter()
        .filter(|&i| backends[i].weight > 0)
        .map(|i| {
            let (offset, skip) = offset_skip(&backends[i].id, size);
            Filler {
                index: i as u32,
                weight: u64::from(backends[i].weight),
                credit: max_weight / 2,
                next: offset,
                skip,
            }
        })
        .collect();

    let mut filled = 0;
    loop {
        for f in &mut fillers {
            f.credit += f.weight;
            if f.credit < max_weight {
                continue;
            }
            f.credit -= max_weight;
            // The permutation visits every slot and some are free: this ends.
            while table[f.next as usize] != EMPTY {
                f.next = (f.next + f.skip) % m;
            }
            table[f.next as usize] = f.index;
            f.next = (f.next + f.skip) % m;
            filled += 1;
            if filled == size {
                return Ok(table);
            }
        }
    }
}

/// A backend's place in its preference list: (offset, skip) for a table of
/// prime `size`.
pub fn offset_skip(id: &[u8], size: usize) -> (u64, u64) {
    let m = size as u64;
    let offset = siphash24(OFFSET_KEY.0, OFFSET_KEY.1, id) % m;
    let skip = siphash24(SKIP_KEY.0, SKIP_KEY.1, id) % (m - 1) + 1;
    (offset, skip)
}

/// The slots whose value differs, with their new value: the only writes an
/// update needs. Both tables have the same size.
pub fn diff(old: &[u32], new: &[u32]) -> Vec<(u32, u32)> {
    assert_eq!(old.len(), new.len(), "tables of different sizes");
    old.iter().zip(new).enumerate().filter(|(_, (o, n))| o != n).map(|(slot, (_, &n))| (slot as u32, n)).collect()
}

/// Replaces each index of `table` by `numbers[index]` (e.g. the datapath's
/// backend numbers); EMPTY stays EMPTY.
pub fn to_numbers(table: &[u32], numbers: &[u32]) -> Vec<u32> {
    table.iter().map(|&i| if i == EMPTY { EMPTY } else { numbers[i as usize] }).collect()
}

/// The slot of a flow in a table of `size` slots, as the datapath picks it:
/// `((hash as u64) * size) >> 32` (L4LB_MAGLEV_SIZE in the datapath).
pub fn flow_slot(flow: &Flow, seed: u32, size: usize) -> usize {
    crate::flow_hash::scale(flow.hash(seed), size)
}

pub const fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// The smallest prime >= n.
pub const fn next_prime(n: usize) -> usize {
    let mut p = n;
    while !is_prime(p) {
        p += 1;
    }
    p
}

/// SipHash-2-4 (Aumasson and Bernstein's reference algorithm) of `data` with
/// the key (k0, k1), the key's 16 bytes read as two little-endian words.
pub fn siphash24(k0: u64, k1: u64, data: &[u8]) -> u64 {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13);
        v[1] ^= v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16);
        v[3] ^= v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21);
        v[3] ^= v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17);
        v[1] ^= v[2];
        v[2] = v[2].rotate_left(32);
    }
    fn compress(v: &mut [u64; 4], m: u64) {
        v[3] ^= m;
        round(v);
        round(v);
        v[0] ^= m;
    }
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        compress(&mut v, u64::from_le_bytes(chunk.try_into().unwrap()));
    }
    let mut last = [0u8; 8];
    last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    last[7] = data.len() as u8;
    compress(&mut v, u64::from_le_bytes(last));
    v[2] ^= 0xff;
    for _ in 0..4 {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::OnceLock;
    use std::time::Instant;

    const FLOWS: usize = 1_000_000;
    const FLOW_SEED: u32 = 0x1234_5678;

    fn backend(i: u32, weight: u32) -> Backend {
        Backend::from_addr(IpAddr::V4(Ipv4Addr::from(0x0a00_0001 + i)), weight)
    }

    fn equal(n: u32) -> Vec<Backend> {
        (0..n).map(|i| backend(i, 1)).collect()
    }

    /// The identity each slot leads to (None when empty): comparable across
    /// backend lists in different orders.
    fn identities<'a>(table: &[u32], backends: &'a [Backend]) -> Vec<Option<&'a [u8]>> {
        table.iter().map(|&i| (i != EMPTY).then(|| backends[i as usize].id.as_slice())).collect()
    }

    /// Flows per slot of TABLE_SIZE for 1,000,000 random flows to one
    /// service (random client address and port), computed once.
    fn flows_per_slot() -> &'static [u32] {
        static HISTOGRAM: OnceLock<Vec<u32>> = OnceLock::new();
        HISTOGRAM.get_or_init(|| {
            let start = Instant::now();
            let mut rng = StdRng::seed_from_u64(42);
            let mut histogram = vec![0u32; TABLE_SIZE];
            for _ in 0..FLOWS {
                let flow = Flow {
                    saddr: Ipv4Addr::from(rng.gen::<u32>()).into(),
                    daddr: Ipv4Addr::new(198, 51, 100, 10).into(),
                    sport: rng.gen(),
                    dport: 443,
                    proto: 6,
                };
                histogram[flow_slot(&flow, FLOW_SEED, TABLE_SIZE)] += 1;
            }
            eprintln!("maglev: {FLOWS} flows hashed in {:?}", start.elapsed());
            histogram
        })
    }

    /// Share of the flows per backend index.
    fn shares(table: &[u32], n: usize) -> Vec<f64> {
        let mut flows = vec![0u64; n];
        for (&i, &count) in table.iter().zip(flows_per_slot()) {
            if i != EMPTY {
                flows[i as usize] += u64::from(count);
            }
        }
        flows.iter().map(|&c| c as f64 / FLOWS as f64).collect()
    }

    /// Fraction of the flows whose backend identity differs.
    fn moved(old: &[u32], old_b: &[Backend], new: &[u32], new_b: &[Backend]) -> f64 {
        let (old, new) = (identities(old, old_b), identities(new, new_b));
        let moved: u64 = (0..TABLE_SIZE).filter(|&s| old[s] != new[s]).map(|s| u64::from(flows_per_slot()[s])).sum();
        moved as f64 / FLOWS as f64
    }

    fn slot_counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &i in table.iter().filter(|&&i| i != EMPTY) {
            counts[i as usize] += 1;
        }
        counts
    }

    #[test]
    fn table_size_is_the_smallest_prime_from_100_times_the_limit() {
        assert_eq!(TABLE_SIZE, 51_203);
        assert!(is_prime(TABLE_SIZE) && TABLE_SIZE >= 100 * MAX_BACKENDS_PER_SERVICE);
        assert!((100 * MAX_BACKENDS_PER_SERVICE..TABLE_SIZE).all(|n| !is_prime(n)));
        assert_eq!(TABLE_SIZE * 4, 204_812, "bytes of map values per service");
        let primes: Vec<usize> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
    }

    #[test]
    #[allow(deprecated)]
    fn siphash_matches_the_reference() {
        // Reference vectors (key 00..0f, message 00..len-1).
        let (k0, k1) = (0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908);
        assert_eq!(siphash24(k0, k1, &[]), 0x726f_db47_dd0e_0e31);
        assert_eq!(siphash24(k0, k1, &[0]), 0x74f8_39c5_93dc_67fd);
        // std's SipHasher is SipHash-2-4 too.
        let data: Vec<u8> = (0..40).collect();
        for len in 0..data.len() {
            for (a, b) in [(k0, k1), OFFSET_KEY, SKIP_KEY] {
                let mut std_hasher = std::hash::SipHasher::new_with_keys(a, b);
                std::hash::Hasher::write(&mut std_hasher, &data[..len]);
                assert_eq!(siphash24(a, b, &data[..len]), std::hash::Hasher::finish(&std_hasher), "len {len}");
            }
        }
    }

    #[test]
    fn equal_backends_get_equal_shares() {
        let backends = equal(32);
        let table = populate(&backends, TABLE_SIZE).unwrap();
        let counts = slot_counts(&table, 32);
        let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
        assert!(max - min <= 1, "slot counts {min}..{max}");
        let shares = shares(&table, 32);
        let mean = 1.0 / 32.0;
        let deviation = shares.iter().map(|s| (s - mean).abs() / mean).fold(0.0, f64::max);
        eprintln!(
            "maglev: 32 equal backends: slots {min}..{max}, max flow-share deviation from mean {:.2}%",
            deviation * 100.0
        );
        assert!(deviation <= 0.02, "max deviation {deviation}");
    }

    #[test]
    fn removing_one_backend_moves_about_its_share() {
        let all = equal(32);
        let before = populate(&all, TABLE_SIZE).unwrap();
        let fewer: Vec<Backend> = all.iter().filter(|b| *b != &backend(7, 1)).cloned().collect();
        let after = populate(&fewer, TABLE_SIZE).unwrap();
        let fraction = moved(&before, &all, &after, &fewer);
        eprintln!("maglev: removing 1 of 32 moves {:.3}% of flows (1/32 = {:.3}%)", fraction * 100.0, 100.0 / 32.0);
        assert!(fraction <= 1.0 / 32.0 + 0.01, "moved {fraction}");

        let back = populate(&all, TABLE_SIZE).unwrap();
        assert_eq!(back, before, "adding it back restores the same table");
    }

    #[test]
    fn adding_one_backend_moves_about_its_share() {
        let all = equal(32);
        let before = populate(&all, TABLE_SIZE).unwrap();
        let more = equal(33);
        let after = populate(&more, TABLE_SIZE).unwrap();
        let fraction = moved(&before, &all, &after, &more);
        eprintln!(
            "maglev: adding a 33rd backend moves {:.3}% of flows (1/33 = {:.3}%)",
            fraction * 100.0,
            100.0 / 33.0
        );
        assert!(fraction <= 1.0 / 33.0 + 0.01, "moved {fraction}");
    }

    #[test]
    fn weights_give_proportional_shares() {
        let backends = vec![backend(0, 1), backend(1, 2), backend(2, 3)];
        let table = populate(&backends, TABLE_SIZE).unwrap();
        let shares = shares(&table, 3);
        let counts = slot_counts(&table, 3);
        for (i, share) in shares.iter().enumerate() {
            let expected = (i + 1) as f64 / 6.0;
            let deviation = (share - expected).abs() / expected;
            eprintln!(
                "maglev: weight {}: {} slots, flow share {:.4} (expected {expected:.4}, deviation {:.2}%)",
                i + 1,
                counts[i],
                share,
                deviation * 100.0
            );
            assert!(deviation <= 0.02, "weight {}: share {share}", i + 1);
            let slots_expected = TABLE_SIZE as f64 * expected;
            assert!((counts[i] as f64 - slots_expected).abs() <= 2.0, "slots proportional over the whole table");
        }
    }

    #[test]
    fn many_weights_are_proportional_in_slots() {
        let backends: Vec<Backend> = (0..MAX_BACKENDS_PER_SERVICE as u32).map(|i| backend(i, 1 + i % 7)).collect();
        let total: u32 = backends.iter().map(|b| b.weight).sum();
        let table = populate(&backends, TABLE_SIZE).unwrap();
        let mut worst: f64 = 0.0;
        for (b, count) in backends.iter().zip(slot_counts(&table, backends.len())) {
            let expected = TABLE_SIZE as f64 * f64::from(b.weight) / f64::from(total);
            worst = worst.max((count as f64 - expected).abs());
            assert!((count as f64 - expected).abs() <= 1.5, "weight {}: {count} slots, expected {expected}", b.weight);
        }
        eprintln!("maglev: 512 backends, weights 1..7: slot counts within {worst:.2} of proportional");
    }

    #[test]
    fn input_order_does_not_matter() {
        let mut backends: Vec<Backend> = (0..40).map(|i| backend(i, 1 + i % 3)).collect();
        backends.push(Backend::from_addr(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)), 2));
        backends.push(Backend::from_addr(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2)), 0));
        let reference = populate(&backends, TABLE_SIZE).unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..3 {
            let mut shuffled = backends.clone();
            shuffled.shuffle(&mut rng);
            let table = populate(&shuffled, TABLE_SIZE).unwrap();
            assert_eq!(identities(&table, &shuffled), identities(&reference, &backends));
        }
    }

    #[test]
    fn draining_takes_a_backend_out_of_new_selections() {
        let mut backends = equal(32);
        let before = populate(&backends, TABLE_SIZE).unwrap();
        backends[7].weight = 0;
        let drained = populate(&backends, TABLE_SIZE).unwrap();
        assert!(!drained.contains(&7), "a draining backend gets no slots");
        assert!(!drained.contains(&EMPTY));
        let removed: Vec<Backend> = backends.iter().filter(|b| b.weight > 0).cloned().collect();
        let without = populate(&removed, TABLE_SIZE).unwrap();
        assert_eq!(identities(&drained, &backends), identities(&without, &removed), "draining = removing");
        let fraction = moved(&before, &equal(32), &drained, &backends);
        eprintln!("maglev: draining 1 of 32 moves {:.3}% of flows", fraction * 100.0);
        assert!(fraction <= 1.0 / 32.0 + 0.01);
    }

    #[test]
    fn no_weight_gives_an_empty_table() {
        assert_eq!(populate(&[], 101).unwrap(), vec![EMPTY; 101]);
        let zero: Vec<Backend> = (0..5).map(|i| backend(i, 0)).collect();
        assert_eq!(populate(&zero, TABLE_SIZE).unwrap(), vec![EMPTY; TABLE_SIZE]);
    }

    #[test]
    fn small_tables_and_bad_input() {
        let table = populate(&equal(3), 7).unwrap();
        let mut counts = slot_counts(&table, 3);
        counts.sort();
        assert_eq!(counts, [2, 2, 3]);
        assert_eq!(populate(&equal(1), 2).unwrap(), [0, 0]);
        assert_eq!(populate(&equal(3), 100), Err(Error::SizeNotPrime(100)));
        assert_eq!(populate(&equal(3), 1), Err(Error::SizeNotPrime(1)));
        assert_eq!(populate(&equal(513), TABLE_SIZE), Err(Error::TooManyBackends(513)));
        let twice = vec![backend(1, 1), backend(2, 1), backend(1, 3)];
        assert_eq!(populate(&twice, 7), Err(Error::DuplicateBackend(vec![10, 0, 0, 2])));
    }

    #[test]
    fn diff_returns_exactly_the_changed_slots() {
        let all = equal(32);
        let numbers: Vec<u32> = (0..32).collect();
        let old = to_numbers(&populate(&all, TABLE_SIZE).unwrap(), &numbers);
        assert!(diff(&old, &old).is_empty());

        let mut backends = all.clone();
        backends[3].weight = 0;
        backends[20].weight = 2;
        let new = to_numbers(&populate(&backends, TABLE_SIZE).unwrap(), &numbers);
        let writes = diff(&old, &new);
        let changed = (0..TABLE_SIZE).filter(|&s| old[s] != new[s]).count();
        assert_eq!(writes.len(), changed);
        assert!(writes.windows(2).all(|w| w[0].0 < w[1].0), "slots in order, each once");
        let mut applied = old.clone();
        for &(slot, value) in &writes {
            assert_ne!(old[slot as usize], value);
            applied[slot as usize] = value;
        }
        assert_eq!(applied, new);
        eprintln!("maglev: draining 1 and doubling 1 of 32 writes {} of {TABLE_SIZE} slots", writes.len());

        assert_eq!(diff(&[1, 2, EMPTY, 4], &[1, 5, 3, 4]), [(1, 5), (2, 3)]);
    }
}
