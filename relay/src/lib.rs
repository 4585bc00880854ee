//! peerlink-relay: the TURN relay (RFC 8656 over UDP) that carries calls whose NATs defeat hole
//! punching. A sans-IO core driven by io_uring (default) and epoll backends. Issue #3.
