//! Builds a TURN Allocate request with long-term credentials (TURN REST style), prints it in
//! hex, parses it back, verifies MESSAGE-INTEGRITY and FINGERPRINT, and prints the attributes.
//!
//! Run: `cargo run -p peerlink-proto --example stun_roundtrip`

use peerlink_proto::attrs::{
    Lifetime, Nonce, Realm, RequestedTransport, Software, Username, attr_type, describe,
};
use peerlink_proto::auth::{long_term_key, rest};
use peerlink_proto::{Message, MessageBuilder, MessageType, TransactionId};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let realm = "peerlink.example";
    let now = 1_700_000_000; // a fixed clock keeps the output reproducible
    let (username, password) = rest::credentials(b"example-shared-secret", "alice", now, 3600);
    let key = long_term_key(&username, realm, &password);
    let tid = TransactionId::from_bytes(*b"peerlink-tid");

    let mut buf = [0u8; 512];
    let mut b = MessageBuilder::new(&mut buf, MessageType::ALLOCATE_REQUEST, tid)?;
    b.add(&RequestedTransport::UDP)?;
    b.add(&Lifetime(600))?;
    b.add(&Username(&username))?;
    b.add(&Realm(realm))?;
    b.add(&Nonce("3q2+7wAAAAB0ZXN0LW5vbmNl"))?;
    b.add(&Software("peerlink-proto example"))?;
    b.add_integrity(&key)?;
    b.add_fingerprint()?;
    let n = b.finish();
    let wire = &buf[..n];

    println!("Allocate request, {n} bytes:");
    for line in wire.chunks(16) {
        let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        println!("  {}", hex.join(" "));
    }

    let msg = Message::parse(wire)?;
    println!(
        "parsed: {} tid={}",
        msg.message_type(),
        msg.transaction_id()
    );
    msg.verify_integrity(&key)?;
    println!("MESSAGE-INTEGRITY: ok (long-term key of {username:?} / {realm:?})");
    println!(
        "FINGERPRINT: {}",
        if msg.has_fingerprint() {
            "ok"
        } else {
            "absent"
        }
    );
    let wrong = long_term_key(&username, realm, "not-the-password");
    println!(
        "with a wrong password: {}",
        match msg.verify_integrity(&wrong) {
            Ok(()) => "accepted (BUG)".to_string(),
            Err(e) => format!("rejected ({e})"),
        }
    );
    println!("attributes:");
    for a in msg.attributes() {
        println!("  {}", describe(a, msg.transaction_id()));
    }
    if msg.has_fingerprint() {
        println!(
            "  FINGERPRINT (0x{:04x}): checked while parsing",
            attr_type::FINGERPRINT
        );
    }
    Ok(())
}
