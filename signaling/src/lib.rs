//! peerlink-signaling: accounts and login, WebSocket sessions, call invitations, candidate and
//! key exchange, durable text messages, TURN credentials and the UDP STUN responder. Issue #4.
