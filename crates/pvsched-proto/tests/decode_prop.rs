//! Property tests: any bytes a guest can write decode to a snapshot or a typed error, never a
//! panic; snapshots respect the VM's limits; the guest API keeps `request` equal to the set of
//! reasons with a non-zero depth.

use proptest::prelude::*;
use pvsched_proto::abi::{feature, BoostState, Reason, Slot, SLOT_SIZE};
use pvsched_proto::guest::{Doorbell, Outcome, PvGuest, RawSlot};
use pvsched_proto::host::{decode, MAX_REPORTED_DEPTH};

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..3 * SLOT_SIZE),
        vcpus in 0u32..1100,
        features in any::<u32>(),
    ) {
        if let Ok(s) = decode(&bytes, vcpus, features) {
            prop_assert!(bytes.len() >= SLOT_SIZE);
            prop_assert_eq!(s.reasons.bits() & !0x1f, 0);
            prop_assert!(s.depth.iter().all(|&d| d <= MAX_REPORTED_DEPTH));
            if let Some(h) = s.hint {
                prop_assert!(features & feature::VCPU_HINT != 0);
                prop_assert!(h.vcpu < vcpus);
            }
            if s.deadline_tsc.is_some() {
                prop_assert!(features & feature::DEADLINE_HINT != 0);
            }
        }
    }

    #[test]
    fn full_slots_of_random_words_never_panic(words in proptest::array::uniform32(any::<u32>())) {
        let mut bytes = [0u8; SLOT_SIZE];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        let _ = decode(&bytes, 4, feature::ALL_V1);
    }

    #[test]
    fn guest_api_keeps_request_consistent_with_depths(
        ops in proptest::collection::vec((0usize..5, any::<bool>()), 0..200),
        boosted in any::<bool>(),
    ) {
        struct NoBell;
        impl Doorbell for NoBell { fn ring(&self) {} }
        let mut slot = Slot {
            state: if boosted { BoostState::Boosted } else { BoostState::Normal } as u32,
            ..Slot::default()
        };
        {
            // SAFETY: `slot` outlives the guest, which is dropped at the end of this block.
            let g = PvGuest::new(unsafe { RawSlot::new(&mut slot) }, NoBell);
            for (r, enter) in &ops {
                let reason = Reason::ALL[*r];
                let out = if *enter { g.enter(reason) } else { g.exit(reason) };
                prop_assert_ne!(out, Outcome::TooDeep);
            }
        }
        let expected: u32 = Reason::ALL
            .iter()
            .filter(|r| slot.depth[r.index()] > 0)
            .map(|r| r.bit())
            .sum();
        prop_assert_eq!(slot.request, expected);
    }
}
