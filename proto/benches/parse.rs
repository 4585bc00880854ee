//! Micro-benchmarks of the STUN/ChannelData hot paths:
//! - parse + MESSAGE-INTEGRITY + FINGERPRINT check of an Allocate request with long-term auth,
//! - parse of a ChannelData frame,
//! - encode of a Binding success response with XOR-MAPPED-ADDRESS + FINGERPRINT.
//!
//! Baselines measured in the same run, to read the figures as ratios: one HMAC-SHA1 and one
//! CRC-32 over the same request bytes (the crypto floor of the integrity/fingerprint checks),
//! and a 160-byte copy (the floor of handling a ChannelData frame at all).
//!
//! Run: `cargo bench -p peerlink-proto --bench parse -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::net::SocketAddr;

use hmac::{Hmac, Mac};
use sha1::Sha1;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use peerlink_proto::attrs::{
    Lifetime, Nonce, Realm, RequestedTransport, Username, XorMappedAddress,
};
use peerlink_proto::auth::long_term_key;
use peerlink_proto::channel::{self, ChannelData};
use peerlink_proto::{Message, MessageBuilder, MessageType, TransactionId};

fn allocate_request(buf: &mut [u8], key: &[u8]) -> usize {
    let tid = TransactionId::from_bytes(*b"bench-tid-01");
    let mut b = MessageBuilder::new(buf, MessageType::ALLOCATE_REQUEST, tid).expect("buffer fits");
    b.add(&RequestedTransport::UDP).expect("fits");
    b.add(&Lifetime(600)).expect("fits");
    b.add(&Username("1700000000:alice")).expect("fits");
    b.add(&Realm("peerlink.example")).expect("fits");
    b.add(&Nonce("0123456789abcdef0123456789abcdef"))
        .expect("fits");
    b.add_integrity(key).expect("fits");
    b.add_fingerprint().expect("fits");
    b.finish()
}

fn benches(c: &mut Criterion) {
    let key = long_term_key("1700000000:alice", "peerlink.example", "s3cret-password");
    let mut buf = [0u8; 512];
    let n = allocate_request(&mut buf, &key);
    let req = &buf[..n];

    let mut g = c.benchmark_group("stun");
    g.throughput(Throughput::Elements(1));
    g.bench_function("allocate_parse_integrity_fingerprint", |bch| {
        bch.iter(|| {
            let m = Message::parse(black_box(req)).expect("valid request");
            m.verify_integrity(black_box(&key)).expect("right key");
            black_box(m.has_fingerprint())
        })
    });
    g.bench_function("allocate_parse_only", |bch| {
        bch.iter(|| black_box(Message::parse(black_box(req)).expect("valid request")))
    });

    let addr: SocketAddr = "203.0.113.7:49152".parse().expect("literal address");
    let tid = TransactionId::from_bytes(*b"bench-tid-02");
    let mut out = [0u8; 128];
    g.bench_function("binding_success_encode_xma_fingerprint", |bch| {
        bch.iter(|| {
            let mut b = MessageBuilder::new(&mut out, MessageType::BINDING_SUCCESS, black_box(tid))
                .expect("buffer fits");
            b.add(&XorMappedAddress(black_box(addr))).expect("fits");
            b.add_fingerprint().expect("fits");
            black_box(b.finish())
        })
    });
    g.finish();

    let payload = [0xA5u8; 160];
    let mut frame = [0u8; 200];
    let fl = channel::encode(0x4001, &payload, &mut frame, false).expect("fits");
    let frame = &frame[..fl];
    let mut g = c.benchmark_group("channel_data");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_160b", |bch| {
        bch.iter(|| black_box(ChannelData::parse(black_box(frame)).expect("valid frame")))
    });
    g.finish();

    let mut g = c.benchmark_group("baseline");
    g.throughput(Throughput::Elements(1));
    g.bench_function("hmac_sha1_over_request", |bch| {
        bch.iter(|| {
            let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(black_box(&key)).expect("any key");
            mac.update(black_box(req));
            black_box(mac.finalize().into_bytes())
        })
    });
    g.bench_function("crc32_over_request", |bch| {
        bch.iter(|| black_box(crc32fast::hash(black_box(req))))
    });
    let mut sink = [0u8; 200];
    g.bench_function("copy_160b", |bch| {
        bch.iter(|| {
            sink[..frame.len()].copy_from_slice(black_box(frame));
            black_box(&sink);
        })
    });
    g.finish();
}

criterion_group!(parse, benches);
criterion_main!(parse);
