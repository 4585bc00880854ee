//! STUN/TURN request processing: Binding, Allocate, Refresh, CreatePermission, ChannelBind,
//! Send indications; long-term authentication; error responses.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peerlink_proto::attrs::{
    AdditionalAddressFamily, AddressErrorCode, AlternateServer, ErrorCode, EvenPort, Lifetime,
    Nonce, Realm, RequestedAddressFamily, RequestedTransport, ReservationToken, Software,
    UnknownAttributes, Username, XorMappedAddress, XorPeerAddress, XorRelayedAddress,
};
use peerlink_proto::auth::{long_term_key, rest};
use peerlink_proto::error_code as ec;
use peerlink_proto::{
    AddressFamily, AttrError, Attribute, Class, EncodeError, Message, MessageBuilder, MessageType,
    Method, ParseError, TransactionId, attr_type,
};

use super::auth::{NONCE_LEN, NonceError};
use super::table::{Cached, Channel, NewAllocation};
use super::{
    AddrFamily, AllocationId, Client, Core, DropReason, FreeReason, HEADROOM, OpenError, Opened,
    Output, PortRequest, QuotaError, RelaySockets, SocketRef, error_index,
};

/// The parts of a request every answer needs.
struct Req<'m> {
    msg: Message<'m>,
    tid: TransactionId,
    method: Method,
    fingerprint: bool,
}

/// A request that passed long-term authentication.
struct Authed<'m> {
    user: &'m str,
    key: [u8; 16],
}

/// Result of a handler: the reply length in scratch, or a non-reply output.
type Handled = Result<usize, Output>;

fn internal(_: EncodeError) -> Output {
    Output::Drop(Some(DropReason::Internal))
}

/// Ends a message: SOFTWARE, MESSAGE-INTEGRITY (with `key`), FINGERPRINT (if `fp`).
fn seal(
    mut b: MessageBuilder<'_>,
    software: Option<&str>,
    key: Option<&[u8; 16]>,
    fp: bool,
) -> Result<usize, EncodeError> {
    if let Some(s) = software {
        b.add(&Software(s))?;
    }
    if let Some(k) = key {
        b.add_integrity(k)?;
    }
    if fp {
        b.add_fingerprint()?;
    }
    Ok(b.finish())
}

fn family_of(addr: &SocketAddr) -> AddrFamily {
    match addr {
        SocketAddr::V4(_) => AddrFamily::V4,
        SocketAddr::V6(_) => AddrFamily::V6,
    }
}

impl Core {
    /// Entry point for a datagram on the listener or a frame of a client's stream.
    pub(super) fn listener(
        &mut self,
        now: Instant,
        src: Client,
        buf: &mut [u8],
        len: usize,
        scratch: &mut [u8],
        sockets: &mut dyn RelaySockets,
    ) -> Output {
        let Some(end) = HEADROOM.checked_add(len).filter(|&e| e <= buf.len()) else {
            return Output::Drop(Some(DropReason::Malformed));
        };
        let Some(&first) = buf[HEADROOM..end].first() else {
            return Output::Drop(Some(DropReason::NotStun));
        };
        match first >> 6 {
            0 => self.stun(now, src, buf, end, scratch, sockets),
            1 => self.channel_from_client(now, src, buf, end, scratch),
            _ => Output::Drop(Some(DropReason::NotStun)),
        }
    }

    /// The live allocation of a client 5-tuple (an expired one not yet swept counts as gone).
    pub(super) fn live(&self, src: &Client, now: Instant) -> Option<AllocationId> {
        let id = self.table.by_client(src)?;
        self.table.get(id).filter(|a| a.expires > now).map(|_| id)
    }

    fn stun(
        &mut self,
        now: Instant,
        src: Client,
        buf: &mut [u8],
        end: usize,
        scratch: &mut [u8],
        sockets: &mut dyn RelaySockets,
    ) -> Output {
        let msg = match Message::parse(&buf[HEADROOM..end]) {
            Ok(m) => m,
            Err(ParseError::TooShort { .. } | ParseError::NotStun | ParseError::BadMagicCookie) => {
                return Output::Drop(Some(DropReason::NotStun));
            }
            Err(ParseError::FingerprintMismatch | ParseError::BadFingerprintLength) => {
                return Output::Drop(Some(DropReason::BadFingerprint));
            }
            Err(_) => return Output::Drop(Some(DropReason::Malformed)),
        };
        let req = Req {
            msg,
            tid: msg.transaction_id(),
            method: msg.method(),
            fingerprint: msg.has_fingerprint(),
        };
        match msg.class() {
            Class::Request => {}
            Class::Indication => {
                if req.method == Method::SEND {
                    self.counters.ind_send += 1;
                    let parsed = self.parse_send(now, src, &req, buf.as_ptr() as usize);
                    return match parsed {
                        Ok((id, peer, start, dlen)) => {
                            self.client_to_peer(now, id, peer, buf, start, dlen, scratch, true)
                        }
                        Err(out) => out,
                    };
                }
                // Binding indications are keepalives; anything else is not ours.
                return if req.method == Method::BINDING {
                    Output::Drop(None)
                } else {
                    Output::Drop(Some(DropReason::Unexpected))
                };
            }
            Class::Success | Class::Error => return Output::Drop(Some(DropReason::Unexpected)),
        }
        let method = req.method;
        let c = &mut self.counters;
        match method {
            Method::BINDING => c.req_binding += 1,
            Method::ALLOCATE => c.req_allocate += 1,
            Method::REFRESH => c.req_refresh += 1,
            Method::CREATE_PERMISSION => c.req_create_permission += 1,
            Method::CHANNEL_BIND => c.req_channel_bind += 1,
            _ => c.req_other += 1,
        }
        let handled = match method {
            Method::BINDING => self.binding(src, &req, scratch),
            Method::ALLOCATE
            | Method::REFRESH
            | Method::CREATE_PERMISSION
            | Method::CHANNEL_BIND => {
                if let Some(n) = self.retransmission(now, src, &req, scratch) {
                    return Output::Reply {
                        from: SocketRef::Listener,
                        to: src.addr,
                        len: n,
                        data: false,
                    };
                }
                match self.authenticate(now, src, &req, scratch) {
                    Err(out) => Err(out),
                    Ok(auth) => {
                        let unknown = req.msg.unknown_comprehension_required();
                        if !unknown.is_empty() {
                            self.error(
                                scratch,
                                &req,
                                ec::UNKNOWN_ATTRIBUTE,
                                Some(&auth.key),
                                Some(&unknown),
                            )
                        } else {
                            match method {
                                Method::ALLOCATE => {
                                    self.allocate(now, src, &req, &auth, scratch, sockets)
                                }
                                Method::REFRESH => {
                                    self.refresh(now, src, &req, &auth, scratch, sockets)
                                }
                                Method::CREATE_PERMISSION => {
                                    self.create_permission(now, src, &req, &auth, scratch)
                                }
                                _ => self.channel_bind(now, src, &req, &auth, scratch),
                            }
                        }
                    }
                }
            }
            _ => self.unauth_error(now, src, &req, ec::BAD_REQUEST, scratch),
        };
        match handled {
            Ok(len) => {
                self.remember(now, src, &req, &scratch[..len]);
                Output::Reply {
                    from: SocketRef::Listener,
                    to: src.addr,
                    len,
                    data: false,
                }
            }
            Err(out) => out,
        }
    }

    /// Keeps the answer to a request on an existing allocation for its retransmissions.
    fn remember(&mut self, now: Instant, src: Client, req: &Req<'_>, reply: &[u8]) {
        if !matches!(
            req.method,
            Method::ALLOCATE | Method::REFRESH | Method::CREATE_PERMISSION | Method::CHANNEL_BIND
        ) {
            return;
        }
        let Some(id) = self.live(&src, now) else {
            return;
        };
        let Some(a) = self.table.get_mut(id) else {
            return;
        };
        let slot = if req.method == Method::ALLOCATE {
            if a.allocated.is_some() {
                return; // only the creating transaction's answer is replayed
            }
            &mut a.allocated
        } else {
            &mut a.last
        };
        let c = slot.get_or_insert_with(Cached::default);
        c.tid = req.tid.0;
        c.method = req.method.0;
        c.bytes.clear();
        c.bytes.extend_from_slice(reply);
    }

    /// The cached answer if `req` retransmits the last request on this 5-tuple's allocation.
    fn retransmission(
        &mut self,
        now: Instant,
        src: Client,
        req: &Req<'_>,
        scratch: &mut [u8],
    ) -> Option<usize> {
        let id = self.live(&src, now)?;
        let a = self.table.get(id)?;
        let c = if req.method == Method::ALLOCATE {
            &a.allocated
        } else {
            &a.last
        }
        .as_ref()?;
        if c.tid != req.tid.0 || c.method != req.method.0 {
            return None;
        }
        let out = scratch.get_mut(..c.bytes.len())?;
        out.copy_from_slice(&c.bytes);
        Some(c.bytes.len())
    }

    fn binding(&mut self, src: Client, req: &Req<'_>, scratch: &mut [u8]) -> Handled {
        let unknown = req.msg.unknown_comprehension_required();
        if !unknown.is_empty() {
            return self.error(scratch, req, ec::UNKNOWN_ATTRIBUTE, None, Some(&unknown));
        }
        let typ = MessageType::new(Class::Success, Method::BINDING);
        let mut b = MessageBuilder::new(scratch, typ, req.tid).map_err(internal)?;
        b.add(&XorMappedAddress(src.addr)).map_err(internal)?;
        let n = seal(b, self.cfg.software.as_deref(), None, req.fingerprint).map_err(internal)?;
        self.counters.resp_success += 1;
        Ok(n)
    }

    /// Writes an error response (MESSAGE-INTEGRITY with `key` when the request authenticated).
    fn error(
        &mut self,
        scratch: &mut [u8],
        req: &Req<'_>,
        code: u16,
        key: Option<&[u8; 16]>,
        unknown: Option<&UnknownAttributes>,
    ) -> Handled {
        let typ = MessageType::new(Class::Error, req.method);
        let mut b = MessageBuilder::new(scratch, typ, req.tid).map_err(internal)?;
        b.add(&ErrorCode::new(code)).map_err(internal)?;
        if let Some(u) = unknown {
            b.add(u).map_err(internal)?;
        }
        let n = seal(b, self.cfg.software.as_deref(), key, req.fingerprint).map_err(internal)?;
        self.counters.resp_error[error_index(code)] += 1;
        Ok(n)
    }

    /// An error to a request that did not authenticate (401, 438, 400): rate limited per source
    /// IP, no state; 401 and 438 carry REALM and a fresh NONCE. Nothing else (no SOFTWARE):
    /// the source address is unverified, so the answer stays as small as TURN allows.
    fn unauth_error(
        &mut self,
        now: Instant,
        src: Client,
        req: &Req<'_>,
        code: u16,
        scratch: &mut [u8],
    ) -> Handled {
        if !self.limiter.allow(now, src.addr.ip()) {
            return Err(Output::Drop(Some(DropReason::RateLimited)));
        }
        let typ = MessageType::new(Class::Error, req.method);
        let mut b = MessageBuilder::new(scratch, typ, req.tid).map_err(internal)?;
        b.add(&ErrorCode::new(code)).map_err(internal)?;
        if code == ec::UNAUTHORIZED || code == ec::STALE_NONCE {
            let mut nbuf = [0u8; NONCE_LEN];
            let nonce = self.nonces.make(now, src.addr, &mut nbuf);
            b.add(&Realm(&self.cfg.realm)).map_err(internal)?;
            b.add(&Nonce(nonce)).map_err(internal)?;
        }
        let n = seal(b, None, None, req.fingerprint).map_err(internal)?;
        self.counters.resp_error[error_index(code)] += 1;
        Ok(n)
    }

    /// Long-term credential check (RFC 8489 section 9.2.4), static users then REST secrets.
    fn authenticate<'m>(
        &mut self,
        now: Instant,
        src: Client,
        req: &Req<'m>,
        scratch: &mut [u8],
    ) -> Result<Authed<'m>, Output> {
        let msg = &req.msg;
        if !msg.has_integrity() {
            return Err(self.unauth_reply(now, src, req, ec::UNAUTHORIZED, scratch));
        }
        let (Some(Ok(Username(user))), Some(Ok(Realm(realm))), Some(Ok(Nonce(nonce)))) = (
            msg.get::<Username>(),
            msg.get::<Realm>(),
            msg.get::<Nonce>(),
        ) else {
            return Err(self.unauth_reply(now, src, req, ec::BAD_REQUEST, scratch));
        };
        if let Err(e) = self.nonces.check(now, src.addr, nonce.as_bytes()) {
            let _: NonceError = e;
            self.counters.stale_nonces += 1;
            return Err(self.unauth_reply(now, src, req, ec::STALE_NONCE, scratch));
        }
        let cfg = &self.cfg;
        let mut found = None;
        let mut tried = false;
        if realm == cfg.realm {
            if let Some(key) = cfg.users.get(user) {
                tried = true;
                if msg.verify_integrity(key).is_ok() {
                    found = Some(*key);
                }
            } else if !cfg.auth_secrets.is_empty() {
                let unix_now = self
                    .shared
                    .unix_at_epoch
                    .saturating_add(now.saturating_duration_since(self.shared.epoch).as_secs());
                // proto accepts at most MAX_SECRETS at once (documented on `auth_secrets`).
                let secrets = cfg
                    .auth_secrets
                    .iter()
                    .take(rest::MAX_SECRETS)
                    .map(Vec::as_slice);
                if let Ok(pw) = rest::validate(secrets, user, unix_now, cfg.rest_max_ttl.as_secs())
                {
                    for p in pw.iter() {
                        tried = true;
                        let key = long_term_key(user, realm, p);
                        if msg.verify_integrity(&key).is_ok() {
                            found = Some(key);
                            break;
                        }
                    }
                }
            }
        }
        if !tried {
            // Unknown user or realm: spend the same HMAC as a wrong password, so timing does
            // not tell which usernames exist.
            let _ = msg.verify_integrity(&[0u8; 16]);
        }
        match found {
            Some(key) => Ok(Authed { user, key }),
            None => {
                self.counters.auth_failures += 1;
                Err(self.unauth_reply(now, src, req, ec::UNAUTHORIZED, scratch))
            }
        }
    }

    fn unauth_reply(
        &mut self,
        now: Instant,
        src: Client,
        req: &Req<'_>,
        code: u16,
        scratch: &mut [u8],
    ) -> Output {
        match self.unauth_error(now, src, req, code, scratch) {
            Ok(len) => Output::Reply {
                from: SocketRef::Listener,
                to: src.addr,
                len,
                data: false,
            },
            Err(out) => out,
        }
    }

    /// The allocation of `src` acted on by `auth`: 437 if none, 441 for another user.
    fn owned(
        &mut self,
        now: Instant,
        src: Client,
        req: &Req<'_>,
        auth: &Authed<'_>,
        scratch: &mut [u8],
    ) -> Result<AllocationId, Result<usize, Output>> {
        let Some(id) = self.live(&src, now) else {
            return Err(self.error(scratch, req, ec::ALLOCATION_MISMATCH, Some(&auth.key), None));
        };
        let same_user = self
            .table
            .get(id)
            .is_some_and(|a| &*a.username == auth.user);
        if !same_user {
            return Err(self.error(scratch, req, ec::WRONG_CREDENTIALS, Some(&auth.key), None));
        }
        Ok(id)
    }

    fn success(
        &mut self,
        scratch: &mut [u8],
        req: &Req<'_>,
        key: &[u8; 16],
        body: impl FnOnce(&mut MessageBuilder<'_>) -> Result<(), EncodeError>,
    ) -> Handled {
        let typ = MessageType::new(Class::Success, req.method);
        let mut b = MessageBuilder::new(scratch, typ, req.tid).map_err(internal)?;
        body(&mut b).map_err(internal)?;
        let n =
            seal(b, self.cfg.software.as_deref(), Some(key), req.fingerprint).map_err(internal)?;
        self.counters.resp_success += 1;
        Ok(n)
    }

    fn allocate(
        &mut self,
        now: Instant,
        src: Client,
        req: &Req<'_>,
        auth: &Authed<'_>,
        scratch: &mut [u8],
        sockets: &mut dyn RelaySockets,
    ) -> Handled {
        let key = Some(&auth.key);
        let msg = &req.msg;
        match self.table.by_client(&src) {
            Some(_) if self.live(&src, now).is_some() => {
                return self.error(scratch, req, ec::ALLOCATION_MISMATCH, key, None);
            }
            Some(stale) => self.free(stale, sockets, FreeReason::Expired),
            None => {}
        }
        match msg.get::<RequestedTransport>() {
            Some(Ok(t)) if t == RequestedTransport::UDP => {}
            Some(Ok(_)) => return self.error(scratch, req, ec::UNSUPPORTED_TRANSPORT, key, None),
            None | Some(Err(_)) => return self.error(scratch, req, ec::BAD_REQUEST, key, None),
        }
        let dont_fragment = msg.contains(attr_type::DONT_FRAGMENT);
        let even = match msg.get::<EvenPort>() {
            None => None,
            Some(Ok(e)) => Some(e),
            Some(Err(_)) => return self.error(scratch, req, ec::BAD_REQUEST, key, None),
        };
        let raf = match msg.get::<RequestedAddressFamily>() {
            None => None,
            Some(Ok(RequestedAddressFamily(f))) => Some(f),
            Some(Err(AttrError::BadFamily(_))) => {
                return self.error(scratch, req, ec::ADDRESS_FAMILY_NOT_SUPPORTED, key, None);
            }
            Some(Err(_)) => return self.error(scratch, req, ec::BAD_REQUEST, key, None),
        };
        let aaf = match msg.get::<AdditionalAddressFamily>() {
            None => None,
            Some(Ok(AdditionalAddressFamily(f))) => Some(f),
            Some(Err(_)) => return self.error(scratch, req, ec::BAD_REQUEST, key, None),
        };
        let token = match msg.get::<ReservationToken>() {
            None => None,
            Some(Ok(ReservationToken(t))) => Some(t),
            Some(Err(_)) => return self.error(scratch, req, ec::BAD_REQUEST, key, None),
        };
        // RFC 8656 7.2 step 4: a token names a port reserved on a family already chosen, so it
        // goes with neither EVEN-PORT nor an address family (400); an unknown or expired token
        // is answered 508 when the socket layer cannot find it.
        if token.is_some() && (even.is_some() || raf.is_some() || aaf.is_some()) {
            return self.error(scratch, req, ec::BAD_REQUEST, key, None);
        }
        let port = match (token, even) {
            (Some(t), _) => PortRequest::Reserved(t),
            (None, Some(e)) if e.reserve => PortRequest::EvenReserveNext,
            (None, Some(_)) => PortRequest::Even,
            (None, None) => PortRequest::Any,
        };
        if (raf.is_some() && aaf.is_some()) || aaf == Some(AddressFamily::V4) {
            return self.error(scratch, req, ec::BAD_REQUEST, key, None);
        }
        // A reserved port brings its own family; `open` ignores this one for it.
        let family = match raf.unwrap_or(AddressFamily::V4) {
            _ if token.is_some() => AddrFamily::V4,
            AddressFamily::V4 if self.relay_v4.is_some() => AddrFamily::V4,
            AddressFamily::V6 if self.relay_v6.is_some() => AddrFamily::V6,
            _ => return self.error(scratch, req, ec::ADDRESS_FAMILY_NOT_SUPPORTED, key, None),
        };
        // Dual allocations are not offered: the IPv6 half of ADDITIONAL-ADDRESS-FAMILY is
        // answered with ADDRESS-ERROR-CODE 440 and the IPv4 allocation proceeds (RFC 8656 7.2).
        let refuse_v6 = aaf == Some(AddressFamily::V6);
        let lifetime = match msg.get::<Lifetime>() {
            None => self.cfg.default_lifetime,
            Some(Ok(Lifetime(s))) => Duration::from_secs(u64::from(s))
                .min(self.cfg.max_lifetime)
                .max(self.cfg.default_lifetime),
            Some(Err(_)) => return self.error(scratch, req, ec::BAD_REQUEST, key, None),
        };
        if self.shared.is_draining() {
            return self.refuse_capacity(scratch, src, req, &auth.key, port);
        }
        let Some(id) = self.table.next_id() else {
            return self.refuse_capacity(scratch, src, req, &auth.key, port);
        };
        let cfg = &self.cfg;
        match self
            .shared
            .try_reserve(auth.user, cfg.max_allocations, cfg.max_allocations_per_user)
        {
            Ok(()) => {}
            Err(QuotaError::User) => {
                return self.error(scratch, req, ec::ALLOCATION_QUOTA_REACHED, key, None);
            }
            Err(QuotaError::Total) => {
                return self.refuse_capacity(scratch, src, req, &auth.key, port);
            }
        }
        let (relayed, reserved) = match sockets.open(id, family, port, now) {
            Ok(Opened { addr, token }) => (addr, token),
            Err(e) => {
                self.shared.release(auth.user);
                let code = match e {
                    OpenError::FamilyNotSupported => ec::ADDRESS_FAMILY_NOT_SUPPORTED,
                    OpenError::NoPorts | OpenError::Io(_) => {
                        return self.refuse_capacity(scratch, src, req, &auth.key, port);
                    }
                    OpenError::NoReservation => ec::INSUFFICIENT_CAPACITY,
                };
                return self.error(scratch, req, code, key, None);
            }
        };
        self.table.insert(
            id,
            NewAllocation {
                client: src,
                relayed,
                username: auth.user.into(),
                key: auth.key,
                expires: now + lifetime,
                dont_fragment,
                bandwidth: self.cfg.bandwidth_limit_bps,
                now,
            },
        );
        self.counters.allocations_created += 1;
        if reserved.is_some() {
            self.counters.ports_reserved += 1;
        }
        if matches!(port, PortRequest::Reserved(_)) {
            self.counters.reservations_claimed += 1;
        }
        let t = src.link.transport().index();
        self.counters.allocations_created_by[t] += 1;
        self.counters.allocations_active_by[t] += 1;
        let secs = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
        self.success(scratch, req, &auth.key, |b| {
            b.add(&XorRelayedAddress(relayed))?;
            b.add(&Lifetime(secs))?;
            b.add(&XorMappedAddress(src.addr))?;
            if let Some(t) = reserved {
                b.add(&ReservationToken(t))?;
            }
            if refuse_v6 {
                b.add(&AddressErrorCode {
                    family: AddressFamily::V6,
                    code: ec::ADDRESS_FAMILY_NOT_SUPPORTED,
                    reason: ec::reason_phrase(ec::ADDRESS_FAMILY_NOT_SUPPORTED),
                })?;
            }
            Ok(())
        })
    }

    /// An Allocate this relay cannot take: 300 Try Alternate naming another relay when io
    /// knows one for the client's transport and family (and the request is not for a port
    /// reserved here), else 508.
    fn refuse_capacity(
        &mut self,
        scratch: &mut [u8],
        src: Client,
        req: &Req<'_>,
        key: &[u8; 16],
        port: PortRequest,
    ) -> Handled {
        let alternate = match port {
            PortRequest::Reserved(_) => None,
            _ => self.shared.alternate_for(src.link.transport(), src.addr),
        };
        let Some(alternate) = alternate else {
            return self.error(scratch, req, ec::INSUFFICIENT_CAPACITY, Some(key), None);
        };
        let typ = MessageType::new(Class::Error, req.method);
        let mut b = MessageBuilder::new(scratch, typ, req.tid).map_err(internal)?;
        b.add(&ErrorCode::new(ec::TRY_ALTERNATE))
            .map_err(internal)?;
        b.add(&AlternateServer(alternate)).map_err(internal)?;
        let n =
            seal(b, self.cfg.software.as_deref(), Some(key), req.fingerprint).map_err(internal)?;
        self.counters.resp_error[error_index(ec::TRY_ALTERNATE)] += 1;
        self.counters.redirected += 1;
        Ok(n)
    }

    fn refresh(
        &mut self,
        now: Instant,
        src: Client,
        req: &Req<'_>,
        auth: &Authed<'_>,
        scratch: &mut [u8],
        sockets: &mut dyn RelaySockets,
    ) -> Handled {
        let key = Some(&auth.key);
        let id = match self.owned(now, src, req, auth, scratch) {
            Ok(id) => id,
            Err(r) => return r,
        };
        let relayed_family = self.table.get(id).map(|a| family_of(&a.relayed));
        match req.msg.get::<RequestedAddressFamily>() {
            None => {}
            Some(Ok(RequestedAddressFamily(f))) => {
                let f = match f {
                    AddressFamily::V4 => AddrFamily::V4,
                    AddressFamily::V6 => AddrFamily::V6,
                };
                if Some(f) != relayed_family {
                    return self.error(scratch, req, ec::PEER_ADDRESS_FAMILY_MISMATCH, key, None);
                }
            }
            Some(Err(_)) => return self.error(scratch, req, ec::BAD_REQUEST, key, None),
        }
        let requested = match req.msg.get::<Lifetime>() {
            None => self.cfg.default_lifetime,
            Some(Ok(Lifetime(s))) => Duration::from_secs(u64::from(s)),
            Some(Err(_)) => return self.error(scratch, req, ec::BAD_REQUEST, key, None),
        };
        if requested.is_zero() {
            self.free(id, sockets, FreeReason::Deleted);
            return self.success(scratch, req, &auth.key, |b| b.add(&Lifetime(0)));
        }
        let lifetime = requested.min(self.cfg.max_lifetime);
        if let Some(a) = self.table.get_mut(id) {
            a.expires = now + lifetime;
        }
        self.table.reschedule(id);
        let secs = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
        self.success(scratch, req, &auth.key, |b| b.add(&Lifetime(secs)))
    }

    /// Checks a peer for CreatePermission/ChannelBind: 443 on family mismatch, 403 if denied.
    fn check_peer(&self, id: AllocationId, peer: &SocketAddr) -> Result<(), u16> {
        let relayed = self.table.get(id).map(|a| a.relayed);
        if relayed.is_some_and(|r| family_of(&r) != family_of(peer)) {
            return Err(ec::PEER_ADDRESS_FAMILY_MISMATCH);
        }
        if !self.policy.allowed(*peer) {
            return Err(ec::FORBIDDEN);
        }
        Ok(())
    }

    fn create_permission(
        &mut self,
        now: Instant,
        src: Client,
        req: &Req<'_>,
        auth: &Authed<'_>,
        scratch: &mut [u8],
    ) -> Handled {
        let key = Some(&auth.key);
        let id = match self.owned(now, src, req, auth, scratch) {
            Ok(id) => id,
            Err(r) => return r,
        };
        let mut peers: Vec<SocketAddr> = Vec::new();
        for a in req
            .msg
            .attributes()
            .filter(|a| a.typ == attr_type::XOR_PEER_ADDRESS)
        {
            match XorPeerAddress::decode(a.value, &req.tid) {
                Ok(XorPeerAddress(p)) => peers.push(p),
                Err(_) => return self.error(scratch, req, ec::BAD_REQUEST, key, None),
            }
            if peers.len() > self.cfg.max_permissions {
                return self.error(scratch, req, ec::INSUFFICIENT_CAPACITY, key, None);
            }
        }
        if peers.is_empty() {
            return self.error(scratch, req, ec::BAD_REQUEST, key, None);
        }
        // All or nothing: every peer is checked before any permission is installed.
        for p in &peers {
            if let Err(code) = self.check_peer(id, p) {
                return self.error(scratch, req, code, key, None);
            }
        }
        let max = self.cfg.max_permissions;
        let expires = now + self.cfg.permission_lifetime;
        let Some(a) = self.table.get_mut(id) else {
            return self.error(scratch, req, ec::ALLOCATION_MISMATCH, key, None);
        };
        let mut new = 0;
        for (i, p) in peers.iter().enumerate() {
            let ip = p.ip();
            if !a.perms.contains_key(&ip) && !peers[..i].iter().any(|q| q.ip() == ip) {
                new += 1;
            }
        }
        if a.perms.len() + new > max {
            return self.error(scratch, req, ec::INSUFFICIENT_CAPACITY, key, None);
        }
        for p in &peers {
            a.perms.insert(p.ip(), expires);
        }
        self.table.reschedule(id);
        self.success(scratch, req, &auth.key, |_| Ok(()))
    }

    fn channel_bind(
        &mut self,
        now: Instant,
        src: Client,
        req: &Req<'_>,
        auth: &Authed<'_>,
        scratch: &mut [u8],
    ) -> Handled {
        let key = Some(&auth.key);
        let id = match self.owned(now, src, req, auth, scratch) {
            Ok(id) => id,
            Err(r) => return r,
        };
        // CHANNEL-NUMBER read raw: proto's decoder knows only RFC 8656's range, and the
        // legacy (RFC 5766) range is a configuration choice of this relay.
        let ch = match req.msg.raw(attr_type::CHANNEL_NUMBER) {
            Some(&[a, b, _, _]) => u16::from_be_bytes([a, b]),
            _ => return self.error(scratch, req, ec::BAD_REQUEST, key, None),
        };
        let Some(Ok(XorPeerAddress(peer))) = req.msg.get::<XorPeerAddress>() else {
            return self.error(scratch, req, ec::BAD_REQUEST, key, None);
        };
        if !self.channel_ok(ch) {
            return self.error(scratch, req, ec::BAD_REQUEST, key, None);
        }
        if let Err(code) = self.check_peer(id, &peer) {
            return self.error(scratch, req, code, key, None);
        }
        let (max_ch, max_perm) = (self.cfg.max_channels, self.cfg.max_permissions);
        let ch_expires = now + self.cfg.channel_lifetime;
        let perm_expires = now + self.cfg.permission_lifetime;
        let Some(a) = self.table.get_mut(id) else {
            return self.error(scratch, req, ec::ALLOCATION_MISMATCH, key, None);
        };
        // A number bound (or cooling down) for another peer, or a peer on another number -> 400.
        let by_number = a.channels.get(&ch).map(|c| c.peer);
        let by_peer = a.peer_channels.get(&peer).copied();
        if by_number.is_some_and(|p| p != peer) || by_peer.is_some_and(|n| n != ch) {
            return self.error(scratch, req, ec::BAD_REQUEST, key, None);
        }
        let new_perm = !a.perms.contains_key(&peer.ip());
        if (by_number.is_none() && a.channels.len() >= max_ch)
            || (new_perm && a.perms.len() >= max_perm)
        {
            return self.error(scratch, req, ec::INSUFFICIENT_CAPACITY, key, None);
        }
        a.channels.insert(
            ch,
            Channel {
                peer,
                expires: ch_expires,
            },
        );
        a.peer_channels.insert(peer, ch);
        let p = a.perms.entry(peer.ip()).or_insert(perm_expires);
        *p = (*p).max(perm_expires);
        self.table.reschedule(id);
        self.success(scratch, req, &auth.key, |_| Ok(()))
    }

    /// Validates a Send indication: (allocation, peer, DATA offset in the buffer, DATA length).
    fn parse_send(
        &mut self,
        now: Instant,
        src: Client,
        req: &Req<'_>,
        buf_base: usize,
    ) -> Result<(AllocationId, SocketAddr, usize, usize), Output> {
        // Unknown comprehension-required attributes in an indication: silently discarded.
        if !req.msg.unknown_comprehension_required().is_empty() {
            return Err(Output::Drop(Some(DropReason::Unexpected)));
        }
        let Some(id) = self.live(&src, now) else {
            return Err(Output::Drop(Some(DropReason::NoAllocation)));
        };
        let (Some(Ok(XorPeerAddress(peer))), Some(data)) = (
            req.msg.get::<XorPeerAddress>(),
            req.msg.raw(attr_type::DATA),
        ) else {
            return Err(Output::Drop(Some(DropReason::Malformed)));
        };
        let start = (data.as_ptr() as usize).wrapping_sub(buf_base);
        Ok((id, peer, start, data.len()))
    }
}
