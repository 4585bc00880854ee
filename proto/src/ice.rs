//! Small ICE (RFC 8445) helpers: candidate and pair priorities.

/// Type preference of host candidates (RFC 8445 recommendation).
pub const TYPE_PREF_HOST: u8 = 126;
/// Type preference of peer-reflexive candidates.
pub const TYPE_PREF_PEER_REFLEXIVE: u8 = 110;
/// Type preference of server-reflexive candidates.
pub const TYPE_PREF_SERVER_REFLEXIVE: u8 = 100;
/// Type preference of relayed candidates.
pub const TYPE_PREF_RELAYED: u8 = 0;

/// Candidate priority (RFC 8445 section 5.1.2.1):
/// `2^24 * type_pref + 2^8 * local_pref + (256 - component)`.
/// `component` is 1-based (1 = RTP); 0 is treated as 1.
pub const fn candidate_priority(type_pref: u8, local_pref: u16, component: u8) -> u32 {
    let component = if component == 0 { 1 } else { component };
    ((type_pref as u32) << 24) | ((local_pref as u32) << 8) | (256 - component as u32)
}

/// Candidate pair priority (RFC 8445 section 6.1.2.3), `g` = controlling agent's candidate
/// priority, `d` = controlled agent's: `2^32 * min(g, d) + 2 * max(g, d) + (g > d ? 1 : 0)`.
/// Candidate priorities are below 2^31 (RFC 8445 section 5.1.2), so this cannot overflow for
/// them; larger inputs wrap instead of panicking.
pub const fn pair_priority(g: u32, d: u32) -> u64 {
    let (min, max) = if g < d { (g, d) } else { (d, g) };
    ((min as u64) << 32)
        .wrapping_add(2 * (max as u64))
        .wrapping_add(if g > d { 1 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_priority_formula() {
        // RFC 8445: host, local pref 65535, component 1.
        assert_eq!(candidate_priority(TYPE_PREF_HOST, 65535, 1), 2_130_706_431);
        assert_eq!(candidate_priority(TYPE_PREF_RELAYED, 0, 1), 255);
        assert_eq!(
            candidate_priority(TYPE_PREF_SERVER_REFLEXIVE, 10, 2),
            (100 << 24) + 2560 + 254
        );
        assert_eq!(candidate_priority(1, 0, 0), candidate_priority(1, 0, 1));
        assert_eq!(candidate_priority(255, 65535, 1), u32::MAX);
    }

    #[test]
    fn pair_priority_formula() {
        assert_eq!(pair_priority(10, 20), (10u64 << 32) + 40);
        assert_eq!(pair_priority(20, 10), (10u64 << 32) + 41);
        let top = (1u32 << 31) - 1;
        assert_eq!(
            pair_priority(top, top),
            (u64::from(top) << 32) + 2 * u64::from(top)
        );
        let _ = pair_priority(u32::MAX, u32::MAX); // wraps, no panic
    }
}
