//! Checks of what a party sends: session descriptions (ICE credentials, key, purpose,
//! fingerprint) and candidates (count caps, syntax, the node's candidate policy).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use peerlink_api::signaling::{Candidate, ErrorCode, SessionDesc, SessionPurpose};

use crate::state::AppState;

fn ice_chars(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

pub(super) fn check_candidate(st: &AppState, c: &Candidate) -> Result<(), (ErrorCode, String)> {
    if c.foundation.is_empty() || c.foundation.len() > 32 || !ice_chars(&c.foundation) {
        return Err((
            ErrorCode::Invalid,
            String::from("candidate foundation must be 1-32 ice-chars"),
        ));
    }
    if c.component == 0 || c.port == 0 {
        return Err((
            ErrorCode::Invalid,
            String::from("candidate component and port must be non-zero"),
        ));
    }
    if let Err(why) = st.cfg.candidates.check(c.address) {
        return Err((
            ErrorCode::ForbiddenCandidate,
            format!("candidate address {} {why}", c.address),
        ));
    }
    Ok(())
}

pub(super) fn check_desc(st: &AppState, d: &SessionDesc) -> Result<(), (ErrorCode, String)> {
    if !(4..=256).contains(&d.ice_ufrag.len()) || !ice_chars(&d.ice_ufrag) {
        return Err((
            ErrorCode::Invalid,
            String::from("ice_ufrag must be 4-256 ice-chars"),
        ));
    }
    if !(22..=256).contains(&d.ice_pwd.len()) || !ice_chars(&d.ice_pwd) {
        return Err((
            ErrorCode::Invalid,
            String::from("ice_pwd must be 22-256 ice-chars"),
        ));
    }
    match STANDARD.decode(d.public_key.as_bytes()) {
        Ok(k) if k.len() == 32 => {}
        _ => {
            return Err((
                ErrorCode::Invalid,
                String::from("public_key must be base64 of 32 bytes"),
            ));
        }
    }
    if d.candidates.len() > st.cfg.max_candidates {
        return Err((
            ErrorCode::TooManyCandidates,
            format!(
                "{} candidates, at most {}",
                d.candidates.len(),
                st.cfg.max_candidates
            ),
        ));
    }
    if let Some(fp) = &d.transfer_fingerprint
        && (fp.len() != 64 || !fp.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
    {
        return Err((
            ErrorCode::Invalid,
            String::from("transfer_fingerprint must be 64 lowercase hex digits"),
        ));
    }
    if d.nat.is_some_and(|n| !n.is_consistent()) {
        return Err((
            ErrorCode::Invalid,
            String::from(
                "nat: port_delta must be given (non-zero, at most 16 either way) exactly when port_allocation is sequential",
            ),
        ));
    }
    if let SessionPurpose::File { name, .. } = &d.purpose
        && (name.is_empty()
            || name.len() > 255
            || name.contains(['/', '\\'])
            || name.chars().any(char::is_control)
            || name == "."
            || name == "..")
    {
        return Err((
            ErrorCode::Invalid,
            String::from(
                "file name must be 1-255 bytes, not `.` or `..`, without path separators or control characters",
            ),
        ));
    }
    d.candidates.iter().try_for_each(|c| check_candidate(st, c))
}
