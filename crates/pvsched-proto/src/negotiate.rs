//! Version and feature negotiation.
//!
//! The guest writes an *offer* to the negotiation MSR: bits 0..16 a bitmap of the versions it
//! speaks (bit `v` = version `v`; bit 0 is reserved), bits 32..64 the features it wants. The
//! host answers on the next read: bits 0..16 the chosen version (0 = none), bits 32..64 the
//! accepted features. The chosen version is the highest one both sides speak; the accepted
//! features are those both sides want *and* that version defines, so unknown features stay
//! off. No common version means no boosting, never an error: the guest keeps running.

use crate::abi::{feature, VERSION_1};

/// The outcome of a successful negotiation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Negotiated {
    /// Chosen protocol version (≥ 1).
    pub version: u16,
    /// Accepted feature bits.
    pub features: u32,
}

/// Encodes a guest offer.
pub const fn offer(versions: u16, features: u32) -> u64 {
    (versions as u64) | ((features as u64) << 32)
}

/// Splits an offer into (versions bitmap, features).
pub const fn decode_offer(offer: u64) -> (u16, u32) {
    (offer as u16, (offer >> 32) as u32)
}

/// Features version `version` defines (0 for versions this crate does not know).
pub const fn known_features(version: u16) -> u32 {
    match version {
        VERSION_1 => feature::ALL_V1,
        _ => 0,
    }
}

/// Chooses the version and features for a guest `offer` against the host's
/// `host_versions` bitmap and `host_features`. `None` when there is no common version.
pub fn negotiate(host_versions: u16, host_features: u32, offer: u64) -> Option<Negotiated> {
    let (guest_versions, guest_features) = decode_offer(offer);
    // Bit 0 is reserved; only versions this implementation knows can be chosen.
    let common = host_versions & guest_versions & !1 & known_versions();
    if common == 0 {
        return None;
    }
    let version = 15 - common.leading_zeros() as u16;
    Some(Negotiated {
        version,
        features: host_features & guest_features & known_features(version),
    })
}

/// Bitmap of the versions this implementation knows: protocol v1 and, as version 3, the
/// pvsched v3 page ([`crate::v3`]), which has no feature bits of its own.
pub const fn known_versions() -> u16 {
    (1 << VERSION_1) | (1 << crate::v3::PVSCHED_VERSION_V3)
}

/// Encodes the host's answer (0 when there is no common version).
pub const fn answer(n: Option<Negotiated>) -> u64 {
    match n {
        Some(n) => (n.version as u64) | ((n.features as u64) << 32),
        None => 0,
    }
}

/// Decodes the host's answer as the guest reads it.
pub const fn decode_answer(v: u64) -> Option<Negotiated> {
    let version = v as u16;
    if version == 0 {
        None
    } else {
        Some(Negotiated {
            version,
            features: (v >> 32) as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::VERSIONS_V1;

    #[test]
    fn v1_with_common_features() {
        let n = negotiate(
            VERSIONS_V1,
            feature::ALL_V1,
            offer(
                VERSIONS_V1,
                feature::DEADLINE_HINT | feature::UNBOOST_DOORBELL,
            ),
        )
        .unwrap();
        assert_eq!(n.version, 1);
        assert_eq!(
            n.features,
            feature::DEADLINE_HINT | feature::UNBOOST_DOORBELL
        );
        assert_eq!(decode_answer(answer(Some(n))), Some(n));
    }

    #[test]
    fn unknown_features_stay_off() {
        let n = negotiate(VERSIONS_V1, u32::MAX, offer(VERSIONS_V1, u32::MAX)).unwrap();
        assert_eq!(n.features, feature::ALL_V1);
    }

    #[test]
    fn host_features_limit_the_result() {
        let n = negotiate(
            VERSIONS_V1,
            feature::VCPU_HINT,
            offer(VERSIONS_V1, u32::MAX),
        )
        .unwrap();
        assert_eq!(n.features, feature::VCPU_HINT);
    }

    #[test]
    fn no_common_version_is_none() {
        // Guest speaks only a future version 2.
        assert_eq!(
            negotiate(VERSIONS_V1, feature::ALL_V1, offer(1 << 2, 0)),
            None
        );
        // Host offers only version 2, which this implementation does not know.
        assert_eq!(negotiate(1 << 2, 0, offer(VERSIONS_V1 | 1 << 2, 0)), None);
        // Reserved bit 0 does not count as a version.
        assert_eq!(negotiate(1, 0, offer(1, 0)), None);
        assert_eq!(answer(None), 0);
        assert_eq!(decode_answer(0), None);
    }

    #[test]
    fn highest_common_known_version_wins() {
        let n = negotiate(0xfffe, 0, offer(0xfffe, 0)).unwrap();
        assert_eq!(
            n.version, 3,
            "v1 and the v3 page are known; the highest wins"
        );
        let n = negotiate(0xfff6, u32::MAX, offer(0xfff6, u32::MAX)).unwrap();
        assert_eq!(
            n,
            Negotiated {
                version: 1,
                features: feature::ALL_V1
            }
        );
        let n = negotiate(1 << 3, u32::MAX, offer(u16::MAX, u32::MAX)).unwrap();
        assert_eq!(
            n,
            Negotiated {
                version: 3,
                features: 0
            },
            "v3 has no feature bits"
        );
    }
}
