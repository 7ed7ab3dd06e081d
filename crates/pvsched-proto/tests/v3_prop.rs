//! The v3 page decoders on arbitrary (hostile) input: never a panic, and whatever is
//! accepted is exactly what the ABI allows (it re-encodes to the same words).

use proptest::prelude::*;
use pvsched_proto::v3::*;

/// A page mostly zero with `edits` bytes written at arbitrary offsets, so that accepted and
/// rejected pages both occur (fully random pages are almost all rejected).
fn edited_page(edits: &[(u16, u8)], base: bool) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    if base {
        Request::default_policy().write(&mut p);
    }
    for &(at, v) in edits {
        p[at as usize % PAGE_SIZE] = v;
    }
    p
}

proptest! {
    #[test]
    fn negotiation_never_panics_and_enables_only_clean_default_pages(
        edits in proptest::collection::vec((any::<u16>(), any::<u8>()), 0..6),
        base in any::<bool>(),
        len in 0usize..PAGE_SIZE + 8,
    ) {
        let p = edited_page(&edits, base);
        let short = &p[..len.min(PAGE_SIZE)];
        match negotiate(short) {
            Err(PageError::Short { len: l }) => prop_assert!(l < PAGE_SIZE),
            Err(e) => prop_assert!(false, "unexpected {e}"),
            Ok(a) => {
                prop_assert_eq!(short.len(), PAGE_SIZE);
                if a.status == Status::Enabled {
                    let r = Request::read(short).unwrap();
                    prop_assert_eq!(r, Request::default_policy());
                    prop_assert!(attach_check(short).is_ok());
                }
            }
        }
    }

    #[test]
    fn accepted_guest_areas_re_encode_to_the_same_words(
        intent in any::<u64>(),
        cs_state in prop_oneof![any::<u64>(), 0u64..16],
        ack in any::<u64>(),
        reserved_nonzero in any::<bool>(),
        small in (0u8..8, any::<i8>(), 0u8..101, any::<bool>(), any::<bool>()),
    ) {
        // Half the intents are built from small field values so that valid ones occur.
        let (class, nice, prio, pend, idle) = small;
        let crafted = u64::from_le_bytes([
            class, nice as u8, prio, if pend { class } else { 0 }, 0, if pend { prio } else { 0 },
            u8::from(pend) | (u8::from(idle) << 1), 0,
        ]);
        for word in [intent, crafted] {
            let mut reserved = [0u8; 40];
            if reserved_nonzero {
                reserved[(ack % 40) as usize] = 1;
            }
            match decode_guest_words(word, cs_state, ack, &reserved) {
                Ok(g) => {
                    prop_assert!(!reserved_nonzero);
                    prop_assert_eq!(g.intent.encode(), word);
                    prop_assert_eq!(g.cs & !cs::VALID, 0);
                    prop_assert!(g.intent.current.is_valid());
                    prop_assert!(g.intent.pending.is_none_or(|p| p.is_valid()));
                    prop_assert_eq!(g.ack, ack);
                }
                Err(_) => prop_assert!(
                    reserved_nonzero
                        || cs_state & !cs::VALID != 0
                        || TaskIntent::decode(word).is_err()
                ),
            }
        }
    }

    #[test]
    fn applied_words_decode_only_what_encodes(raw in any::<u64>()) {
        if let Some(a) = AppliedState::decode(raw) {
            prop_assert_eq!(a.encode(), raw);
        }
    }
}
