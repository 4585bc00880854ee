//! STUN/TURN error codes (RFC 8489 section 14.8, RFC 8656 section 18.6) and their reason
//! phrases.

/// Try Alternate: use the server in ALTERNATE-SERVER.
pub const TRY_ALTERNATE: u16 = 300;
/// Bad Request: malformed.
pub const BAD_REQUEST: u16 = 400;
/// Unauthorized: missing or wrong credentials.
pub const UNAUTHORIZED: u16 = 401;
/// Forbidden: e.g. a peer address the policy refuses.
pub const FORBIDDEN: u16 = 403;
/// Unknown Attribute: unknown comprehension-required attributes (listed in
/// UNKNOWN-ATTRIBUTES).
pub const UNKNOWN_ATTRIBUTE: u16 = 420;
/// Allocation Mismatch: no allocation, or one already exists, for this 5-tuple.
pub const ALLOCATION_MISMATCH: u16 = 437;
/// Stale Nonce: retry with the NONCE in this answer.
pub const STALE_NONCE: u16 = 438;
/// Address Family not Supported.
pub const ADDRESS_FAMILY_NOT_SUPPORTED: u16 = 440;
/// Wrong Credentials: not the credentials that created the allocation.
pub const WRONG_CREDENTIALS: u16 = 441;
/// Unsupported Transport Protocol.
pub const UNSUPPORTED_TRANSPORT: u16 = 442;
/// Peer Address Family Mismatch.
pub const PEER_ADDRESS_FAMILY_MISMATCH: u16 = 443;
/// Allocation Quota Reached: the user has too many allocations.
pub const ALLOCATION_QUOTA_REACHED: u16 = 486;
/// Role Conflict (ICE, RFC 8445).
pub const ROLE_CONFLICT: u16 = 487;
/// Server Error: a temporary failure.
pub const SERVER_ERROR: u16 = 500;
/// Insufficient Capacity: no more relayed ports or capacity.
pub const INSUFFICIENT_CAPACITY: u16 = 508;

/// The standard reason phrase of a code ("Unknown Error" for others).
pub const fn reason_phrase(code: u16) -> &'static str {
    match code {
        TRY_ALTERNATE => "Try Alternate",
        BAD_REQUEST => "Bad Request",
        UNAUTHORIZED => "Unauthorized",
        FORBIDDEN => "Forbidden",
        UNKNOWN_ATTRIBUTE => "Unknown Attribute",
        ALLOCATION_MISMATCH => "Allocation Mismatch",
        STALE_NONCE => "Stale Nonce",
        ADDRESS_FAMILY_NOT_SUPPORTED => "Address Family not Supported",
        WRONG_CREDENTIALS => "Wrong Credentials",
        UNSUPPORTED_TRANSPORT => "Unsupported Transport Protocol",
        PEER_ADDRESS_FAMILY_MISMATCH => "Peer Address Family Mismatch",
        ALLOCATION_QUOTA_REACHED => "Allocation Quota Reached",
        ROLE_CONFLICT => "Role Conflict",
        SERVER_ERROR => "Server Error",
        INSUFFICIENT_CAPACITY => "Insufficient Capacity",
        _ => "Unknown Error",
    }
}
