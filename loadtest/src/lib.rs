//! peerlink-loadtest: the relay benchmark against coturn and signaling/fleet load on top of the
//! client library. Issues #3, #4.
