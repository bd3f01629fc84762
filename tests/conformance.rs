//! RFC 6455 conformance with raw sockets: every way a client can break the
//! protocol is answered with the close code the RFC names (§7.1.7, §7.4.1)
//! before the TCP connection ends, on `/echo` and on the opcode endpoint.
//!
//! These cover the case families of the Autobahn fuzzingclient that concern
//! a server's reading side: framing (cases 1–3: reserved bits, opcodes),
//! control frames (2, 5: size, fragmentation), UTF-8 (6) and limits (9).
//! Autobahn itself is not run here (its fuzzingclient needs Python 2 or a
//! Docker image). One known non-strict behaviour: tungstenite validates
//! UTF-8 once a whole frame has arrived, so a frame whose payload trickles
//! in with an invalid byte early (Autobahn 6.4.3/6.4.4) fails at the end of
//! that frame rather than at the byte; invalid fragments fail at once.

mod common;

use std::time::Duration;

use common::{config, contains_close_frame, raw_handshake, raw_websocket, TestServer};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use wsproto::Config;

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// One frame as a client sends it: `first` is FIN, RSV and opcode; masked
/// unless `masked` is false.
fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut out = vec![first];
    match payload.len() {
        len @ 0..=125 => out.push(mask_bit | len as u8),
        len @ 126..=0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

const FIN: u8 = 0x80;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;
const PING: u8 = 0x9;

/// What the server sent until it ended the connection, and whether it
/// ended with a reset instead of a FIN.
async fn read_to_end(tcp: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut received = Vec::new();
    let mut reset = false;
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(_) => {
                    reset = true;
                    break;
                }
            }
        }
    });
    read.await.expect("the server ended the connection in time");
    (received, reset)
}

/// Sends `bytes` on a fresh WebSocket at `path` and asserts the server
/// answers with a close frame carrying `code` before ending the connection.
async fn assert_closed_with(server: &TestServer, path: &str, bytes: &[u8], code: u16, case: &str) {
    let mut tcp = raw_websocket(server.addr, path).await;
    tcp.write_all(bytes).await.unwrap();
    let (received, _) = read_to_end(&mut tcp).await;
    assert!(
        contains_close_frame(&received, code),
        "{path}, {case}: expected close {code}, got {received:02x?}"
    );
}

/// The protocol violations of RFC 6455 that must fail the connection with
/// 1002, as (case, bytes).
fn protocol_violations() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("unmasked client frame", frame(FIN | BINARY, b"abcd", false)),
        (
            "RSV1 without an extension",
            frame(FIN | 0x40 | BINARY, b"abcd", true),
        ),
        ("RSV2", frame(FIN | 0x20 | TEXT, b"abcd", true)),
        ("RSV3 on a ping", frame(FIN | 0x10 | PING, b"", true)),
        ("reserved data opcode 3", frame(FIN | 0x3, b"abcd", true)),
        ("reserved data opcode 7", frame(FIN | 0x7, b"", true)),
        ("reserved control opcode 11", frame(FIN | 0xB, b"", true)),
        (
            "reserved control opcode 15",
            frame(FIN | 0xF, b"abcd", true),
        ),
        ("ping over 125 bytes", frame(FIN | PING, &[b'p'; 126], true)),
        ("fragmented ping", frame(PING, b"ping", true)),
        (
            "continuation with nothing to continue",
            frame(FIN | CONTINUATION, b"abcd", true),
        ),
        (
            "new message inside a fragmented one",
            [frame(BINARY, b"ab", true), frame(FIN | BINARY, b"cd", true)].concat(),
        ),
        // A close frame with a 1-byte payload, and with codes no one may send.
        (
            "close with a 1-byte payload",
            frame(FIN | 0x8, &[0x03], true),
        ),
        (
            "close code 1005 on the wire",
            frame(FIN | 0x8, &1005u16.to_be_bytes(), true),
        ),
        (
            "close code 999",
            frame(FIN | 0x8, &999u16.to_be_bytes(), true),
        ),
    ]
}

#[tokio::test]
async fn protocol_violations_get_close_1002_before_the_connection_ends() {
    let server = TestServer::start(config()).await;
    for path in ["/echo", "/ws"] {
        for (case, bytes) in protocol_violations() {
            assert_closed_with(&server, path, &bytes, 1002, case).await;
        }
    }
    server.wait_for_sessions(0).await;
}

#[tokio::test]
async fn invalid_utf8_in_text_gets_close_1007() {
    let server = TestServer::start(config()).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "lone continuation byte",
            frame(FIN | TEXT, b"ab\x80cd", true),
        ),
        ("overlong encoding", frame(FIN | TEXT, b"\xc0\xaf", true)),
        ("UTF-16 surrogate", frame(FIN | TEXT, b"\xed\xa0\x80", true)),
        ("truncated sequence", frame(FIN | TEXT, b"ok\xe2\x82", true)),
        (
            "invalid in a later fragment",
            [
                frame(TEXT, "κόσμε".as_bytes(), true),
                frame(FIN | CONTINUATION, b"\xff", true),
            ]
            .concat(),
        ),
        (
            "sequence cut across fragments, never completed",
            [
                frame(TEXT, b"\xce", true),
                frame(FIN | CONTINUATION, b"", true),
            ]
            .concat(),
        ),
        (
            "close reason that is not UTF-8",
            frame(FIN | 0x8, b"\x03\xe8\xff\xfe", true),
        ),
    ];
    for path in ["/echo", "/ws"] {
        for (case, bytes) in &cases {
            assert_closed_with(&server, path, bytes, 1007, case).await;
        }
    }
    server.wait_for_sessions(0).await;
}

#[tokio::test]
async fn invalid_utf8_fails_at_its_fragment_not_at_the_end_of_the_message() {
    let server = TestServer::start(config()).await;
    for path in ["/echo", "/ws"] {
        let mut tcp = raw_websocket(server.addr, path).await;
        // The first fragment is already invalid; the message never ends.
        tcp.write_all(&frame(TEXT, b"abc\xff", true)).await.unwrap();
        let (received, _) = read_to_end(&mut tcp).await;
        assert!(
            contains_close_frame(&received, 1007),
            "{path}: {received:02x?}"
        );
    }
}

#[tokio::test]
async fn valid_fragmented_and_interleaved_messages_are_echoed() {
    let server = TestServer::start(config()).await;
    let mut tcp = raw_websocket(server.addr, "/echo").await;
    // Text in three fragments, a ping in between, a multi-byte character
    // split across fragments.
    let euro = "€".as_bytes();
    let bytes = [
        frame(TEXT, b"Hello ", true),
        frame(FIN | PING, b"in between", true),
        frame(CONTINUATION, &[b'x', euro[0]], true),
        frame(FIN | CONTINUATION, &euro[1..], true),
        frame(FIN | 0x8, &1000u16.to_be_bytes(), true),
    ]
    .concat();
    tcp.write_all(&bytes).await.unwrap();
    let (received, reset) = read_to_end(&mut tcp).await;
    assert!(!reset);
    let pong = [0x8a, 10]
        .iter()
        .chain(b"in between")
        .copied()
        .collect::<Vec<_>>();
    let text = [&[0x81, "Hello x€".len() as u8][..], "Hello x€".as_bytes()].concat();
    let find = |needle: &[u8]| received.windows(needle.len()).position(|w| w == needle);
    assert!(find(&pong).is_some(), "{received:02x?}");
    assert!(find(&text).is_some(), "{received:02x?}");
    assert!(contains_close_frame(&received, 1000), "{received:02x?}");
}

#[tokio::test]
async fn a_sec_websocket_key_that_is_not_16_base64_bytes_gets_400() {
    let server = TestServer::start(config()).await;
    for key in [
        "",
        "abc",
        "not base64 at all!!!!!!!",
        // Base64 of 15 and of 17 bytes.
        "AAAAAAAAAAAAAAAAAAAA",
        "AAAAAAAAAAAAAAAAAAAAAAA=",
        "AAAAAAAAAAAAAAAAAAAAAAAA",
        "AAAAAAAAAAAAAAAAAAAAAA==AA",
    ] {
        let mut request = format!(
            "GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
        );
        if key.is_empty() {
            request = request.replace("Sec-WebSocket-Key: \r\n", "");
        }
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut received = vec![0u8; 12];
        tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut received))
            .await
            .expect("an answer in time")
            .unwrap();
        let response = String::from_utf8_lossy(&received);
        assert!(response.starts_with("HTTP/1.1 400"), "{key:?}: {response}");
    }
    // The RFC's own example key is fine.
    let (status, _) = raw_handshake(server.addr, "/echo", &[], None).await;
    assert_eq!(status, 101);
}

#[tokio::test]
async fn an_oversized_message_on_echo_gets_1009_and_a_clean_close_not_a_reset() {
    let server = TestServer::start(Config {
        max_message_size: 1024,
        ..config()
    })
    .await;
    for path in ["/echo", "/ws"] {
        let mut tcp = raw_websocket(server.addr, path).await;
        // Far more than the limit, all of it sent: the server stops reading
        // at the header, so unread bytes are waiting when it closes.
        let big = frame(FIN | BINARY, &vec![7u8; 256 * 1024], true);
        let (mut reader, mut writer) = tcp.split();
        let (_, (received, reset)) = tokio::join!(async { writer.write_all(&big).await }, async {
            let mut received = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match tokio::time::timeout(Duration::from_secs(10), reader.read(&mut buf)).await {
                    Ok(Ok(0)) => break (received, false),
                    Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
                    Ok(Err(_)) => break (received, true),
                    Err(_) => panic!("{path}: the server did not end the connection"),
                }
            }
        });
        assert!(
            contains_close_frame(&received, 1009),
            "{path}: {received:02x?}"
        );
        assert!(!reset, "{path}: the connection was reset");
        // A fragmented message adding up past the limit too.
        let fragments = [
            frame(BINARY, &[1u8; 800], true),
            frame(FIN | CONTINUATION, &[2u8; 800], true),
        ]
        .concat();
        assert_closed_with(&server, path, &fragments, 1009, "fragments over the limit").await;
    }
    server.wait_for_sessions(0).await;
}
