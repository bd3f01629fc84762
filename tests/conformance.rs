//! RFC 6455 conformance with raw sockets: valid traffic on `/echo` comes
//! back byte for byte, and every way a client can break the protocol is
//! answered with the close code the RFC names (§7.1.7, §7.4.1) before the
//! TCP connection ends, on `/echo` and on the opcode endpoint.
//!
//! These cover the case families of the Autobahn fuzzingclient: 1 framing
//! (payload lengths at each of the 7-bit, 16-bit and 64-bit length
//! encodings, sent whole and chopped), 2 pings and pongs, 3 reserved bits,
//! 4 reserved opcodes, 5 fragmentation, 6 UTF-8 handling, 7 close handling
//! (valid and invalid codes, malformed close frames, frames after the
//! close), 9 limits (large messages, many fragments, the 1009 limit) and
//! 10.1.1 (a message in 1300-byte fragments). 12 and 13 (permessage-deflate)
//! do not apply: the server negotiates no extensions.
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
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

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

/// `payload` as a client sends it in fragments of `size` bytes: the first
/// with `opcode`, the rest continuations, FIN on the last. An empty payload
/// is one empty frame.
fn fragmented(opcode: u8, payload: &[u8], size: usize) -> Vec<u8> {
    let pieces: Vec<&[u8]> = match payload.is_empty() {
        true => vec![payload],
        false => payload.chunks(size).collect(),
    };
    let last = pieces.len() - 1;
    pieces
        .iter()
        .enumerate()
        .flat_map(|(i, piece)| {
            let opcode = if i == 0 { opcode } else { CONTINUATION };
            let fin = if i == last { FIN } else { 0 };
            frame(fin | opcode, piece, true)
        })
        .collect()
}

/// A payload of `len` bytes for a message with `opcode`: ASCII letters for
/// text, every byte value in turn for binary.
fn payload_of(opcode: u8, len: usize) -> Vec<u8> {
    match opcode {
        TEXT => (0..len).map(|i| b'a' + (i % 26) as u8).collect(),
        _ => (0..len).map(|i| (i % 256) as u8).collect(),
    }
}

fn kind(opcode: u8) -> &'static str {
    match opcode {
        TEXT => "text",
        BINARY => "binary",
        _ => "control",
    }
}

/// Writes `bytes` in pieces of `chop` bytes, letting the server read
/// between them (Autobahn's "chopped" cases); panics after 10 s.
async fn write_in_chops(tcp: &mut TcpStream, bytes: &[u8], chop: usize) {
    let write = async {
        for piece in bytes.chunks(chop) {
            tcp.write_all(piece).await.unwrap();
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), write)
        .await
        .expect("the server took every piece in time");
}

/// The next frame the server sends, header and payload as on the wire;
/// panics after 10 s or if the connection ends first.
async fn next_frame(tcp: &mut TcpStream) -> Vec<u8> {
    let read = async {
        let mut raw = vec![0u8; 2];
        tcp.read_exact(&mut raw).await.expect("a frame header");
        let len = match raw[1] & 0x7f {
            126 => {
                let mut extended = [0u8; 2];
                tcp.read_exact(&mut extended)
                    .await
                    .expect("a 16-bit length");
                raw.extend_from_slice(&extended);
                usize::from(u16::from_be_bytes(extended))
            }
            127 => {
                let mut extended = [0u8; 8];
                tcp.read_exact(&mut extended)
                    .await
                    .expect("a 64-bit length");
                raw.extend_from_slice(&extended);
                u64::from_be_bytes(extended) as usize
            }
            len => usize::from(len),
        };
        let start = raw.len();
        raw.resize(start + len, 0);
        tcp.read_exact(&mut raw[start..])
            .await
            .expect("the whole payload before the connection ended");
        raw
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a frame from the server within 10 s")
}

/// Asserts the next frame the server sends is `expected`, byte for byte.
async fn expect_frame(tcp: &mut TcpStream, expected: &[u8], case: &str) {
    let got = next_frame(tcp).await;
    if got != expected {
        let start = |f: &[u8]| format!("{:02x?}", &f[..f.len().min(16)]);
        let differs_at = got
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| got.len().min(expected.len()));
        panic!(
            "{case}: expected {} bytes starting {}, got {} bytes starting {}; first difference at byte {differs_at}",
            expected.len(),
            start(expected),
            got.len(),
            start(got.as_slice()),
        );
    }
}

/// The close code when `bytes` are exactly one close frame with a code, and
/// nothing else.
fn sole_close_code(bytes: &[u8]) -> Option<u16> {
    let sole_close =
        bytes.len() >= 4 && bytes[0] == (FIN | CLOSE) && usize::from(bytes[1]) == bytes.len() - 2;
    sole_close.then(|| u16::from_be_bytes([bytes[2], bytes[3]]))
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
        ("fragmented pong", frame(PONG, b"pong", true)),
        (
            "continuation with nothing to continue",
            frame(FIN | CONTINUATION, b"abcd", true),
        ),
        (
            "new message inside a fragmented one",
            [frame(BINARY, b"ab", true), frame(FIN | BINARY, b"cd", true)].concat(),
        ),
        (
            "new text message inside a fragmented text message",
            [frame(TEXT, b"ab", true), frame(FIN | TEXT, b"cd", true)].concat(),
        ),
        (
            "continuation after a finished message",
            [
                frame(FIN | TEXT, b"ab", true),
                frame(FIN | CONTINUATION, b"cd", true),
            ]
            .concat(),
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
        (
            "close over 125 bytes",
            frame(
                FIN | CLOSE,
                &[&1000u16.to_be_bytes()[..], &[b'r'; 124][..]].concat(),
                true,
            ),
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

/// Autobahn 1.1.x/1.2.x: each length at the edges of the 7-bit, 16-bit and
/// 64-bit length encodings. The default limit (64 KiB) admits the largest.
#[tokio::test]
async fn text_and_binary_of_every_length_encoding_are_echoed_byte_exactly() {
    let server = TestServer::start(config()).await;
    let mut tcp = raw_websocket(server.addr, "/echo").await;
    for opcode in [TEXT, BINARY] {
        for len in [0, 125, 126, 127, 128, 65535, 65536] {
            let payload = payload_of(opcode, len);
            tcp.write_all(&frame(FIN | opcode, &payload, true))
                .await
                .unwrap();
            let case = format!("{} of {len} bytes", kind(opcode));
            expect_frame(&mut tcp, &frame(FIN | opcode, &payload, false), &case).await;
        }
    }
}

/// Autobahn 1.1.8/1.2.8 (65536 bytes in chops of 997), and frames whose
/// header arrives one byte at a time.
#[tokio::test]
async fn a_message_that_arrives_in_pieces_is_echoed_byte_exactly() {
    let server = TestServer::start(config()).await;
    let mut tcp = raw_websocket(server.addr, "/echo").await;
    tcp.set_nodelay(true).unwrap();
    for (opcode, len, chop) in [
        (TEXT, 125, 1),
        (BINARY, 128, 1),
        (TEXT, 65536, 997),
        (BINARY, 65536, 997),
    ] {
        let payload = payload_of(opcode, len);
        write_in_chops(&mut tcp, &frame(FIN | opcode, &payload, true), chop).await;
        let case = format!("{} of {len} bytes in chops of {chop}", kind(opcode));
        expect_frame(&mut tcp, &frame(FIN | opcode, &payload, false), &case).await;
    }
}

/// Autobahn 2.1–2.4 and 2.6.
#[tokio::test]
async fn a_ping_gets_a_pong_with_the_identical_payload() {
    let server = TestServer::start(config()).await;
    let mut tcp = raw_websocket(server.addr, "/echo").await;
    tcp.set_nodelay(true).unwrap();
    let longest: Vec<u8> = (0..125u8).map(|i| i ^ 0xa5).collect();
    let payloads: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("text", b"Hello, world!".to_vec()),
        (
            "binary",
            vec![0x00, 0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0x00, 0xff],
        ),
        ("125 bytes", longest.clone()),
    ];
    for (case, payload) in &payloads {
        tcp.write_all(&frame(FIN | PING, payload, true))
            .await
            .unwrap();
        expect_frame(&mut tcp, &frame(FIN | PONG, payload, false), case).await;
    }
    write_in_chops(&mut tcp, &frame(FIN | PING, &longest, true), 1).await;
    let pong = frame(FIN | PONG, &longest, false);
    expect_frame(&mut tcp, &pong, "125 bytes, one byte at a time").await;
}

/// Autobahn 2.10.
#[tokio::test]
async fn ten_pings_in_a_row_get_ten_pongs_in_order() {
    let server = TestServer::start(config()).await;
    let mut tcp = raw_websocket(server.addr, "/echo").await;
    let payloads: Vec<Vec<u8>> = (0..10).map(|i| format!("ping {i}").into_bytes()).collect();
    let pings: Vec<u8> = payloads
        .iter()
        .flat_map(|payload| frame(FIN | PING, payload, true))
        .collect();
    let after = frame(FIN | TEXT, b"after the pings", true);
    tcp.write_all(&[pings, after].concat()).await.unwrap();
    for (i, payload) in payloads.iter().enumerate() {
        let case = format!("pong {i}");
        expect_frame(&mut tcp, &frame(FIN | PONG, payload, false), &case).await;
    }
    // Exactly ten: the next frame is the echo.
    let echo = frame(FIN | TEXT, b"after the pings", false);
    expect_frame(&mut tcp, &echo, "the text after the pings").await;
}

/// Autobahn 2.7–2.9.
#[tokio::test]
async fn an_unsolicited_pong_is_ignored_and_the_connection_keeps_working() {
    let server = TestServer::start(config()).await;
    let mut tcp = raw_websocket(server.addr, "/echo").await;
    let bytes = [
        frame(FIN | PONG, b"", true),
        frame(FIN | PONG, b"unsolicited", true),
        frame(FIN | TEXT, b"still here", true),
        frame(FIN | PONG, b"unsolicited again", true),
        frame(FIN | PING, b"solicited", true),
    ]
    .concat();
    tcp.write_all(&bytes).await.unwrap();
    let echo = frame(FIN | TEXT, b"still here", false);
    expect_frame(&mut tcp, &echo, "the text after two pongs").await;
    let pong = frame(FIN | PONG, b"solicited", false);
    expect_frame(&mut tcp, &pong, "the pong to the ping after a pong").await;
}

/// Autobahn 5.3–5.8 and 5.15–5.20: pongs come out as the pings arrive,
/// the message once it is complete, as one frame.
#[tokio::test]
async fn fragmented_messages_are_reassembled_with_pings_answered_in_between() {
    let server = TestServer::start(config()).await;
    let mut tcp = raw_websocket(server.addr, "/echo").await;
    let mut cases: Vec<(String, Vec<u8>, Vec<Vec<u8>>)> = Vec::new();
    for opcode in [TEXT, BINARY] {
        cases.push((
            format!("{} in three fragments, a ping between each", kind(opcode)),
            [
                frame(opcode, b"fragment1 ", true),
                frame(FIN | PING, b"first", true),
                frame(CONTINUATION, b"fragment2 ", true),
                frame(FIN | PING, b"second", true),
                frame(FIN | CONTINUATION, b"fragment3", true),
            ]
            .concat(),
            vec![
                frame(FIN | PONG, b"first", false),
                frame(FIN | PONG, b"second", false),
                frame(FIN | opcode, b"fragment1 fragment2 fragment3", false),
            ],
        ));
        cases.push((
            format!("{} in one-byte fragments", kind(opcode)),
            fragmented(opcode, b"Hello, world!", 1),
            vec![frame(FIN | opcode, b"Hello, world!", false)],
        ));
        cases.push((
            format!("{} with empty first and last fragments", kind(opcode)),
            [
                frame(opcode, b"", true),
                frame(CONTINUATION, b"middle", true),
                frame(FIN | CONTINUATION, b"", true),
            ]
            .concat(),
            vec![frame(FIN | opcode, b"middle", false)],
        ));
        cases.push((
            format!("{} of empty fragments only", kind(opcode)),
            [
                frame(opcode, b"", true),
                frame(FIN | CONTINUATION, b"", true),
            ]
            .concat(),
            vec![frame(FIN | opcode, b"", false)],
        ));
    }
    for (case, bytes, expected) in &cases {
        tcp.write_all(bytes).await.unwrap();
        for (i, expected) in expected.iter().enumerate() {
            expect_frame(&mut tcp, expected, &format!("{case}, frame {i}")).await;
        }
    }
}

/// Autobahn 6.2.x, 6.5.x–6.11.x: valid UTF-8 (two-, three- and four-byte
/// sequences, the boundary code points) whole, in one-byte fragments, and
/// split in two at every byte, so inside every code point.
#[tokio::test]
async fn valid_utf8_is_echoed_intact_even_when_fragments_split_its_code_points() {
    let server = TestServer::start(config()).await;
    let mut tcp = raw_websocket(server.addr, "/echo").await;
    let texts = [
        "Hello-µ@ßöäüàá-UTF-8!!",
        "κόσμε",
        "\u{0}\u{7f}\u{80}\u{7ff}\u{800}\u{d7ff}\u{e000}\u{fffd}\u{ffff}\u{10000}\u{10ffff}",
        "😀 🎉 𝄞",
    ];
    for text in texts {
        let bytes = text.as_bytes();
        let mut ways: Vec<(String, Vec<u8>)> = vec![
            ("in one frame".into(), frame(FIN | TEXT, bytes, true)),
            ("in one-byte fragments".into(), fragmented(TEXT, bytes, 1)),
        ];
        for at in 1..bytes.len() {
            let split = [
                frame(TEXT, &bytes[..at], true),
                frame(FIN | CONTINUATION, &bytes[at..], true),
            ]
            .concat();
            ways.push((format!("split at byte {at}"), split));
        }
        let echo = frame(FIN | TEXT, bytes, false);
        for (how, wire) in ways {
            tcp.write_all(&wire).await.unwrap();
            expect_frame(&mut tcp, &echo, &format!("{text:?} {how}")).await;
        }
    }
}

/// Autobahn 7.3.1, 7.3.3–7.3.5, 7.7.x: the server answers a close with the
/// client's own code and reason (an empty close with an empty one), then
/// ends the connection.
#[tokio::test]
async fn a_close_with_a_valid_code_is_answered_with_the_same_close() {
    let server = TestServer::start(config()).await;
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("no code".into(), Vec::new()),
        (
            "1000 with the longest reason that fits".into(),
            [&1000u16.to_be_bytes()[..], &[b'r'; 123][..]].concat(),
        ),
    ];
    for code in [
        1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
    ] {
        cases.push((format!("code {code}"), code.to_be_bytes().to_vec()));
        cases.push((
            format!("code {code} with a reason"),
            [&code.to_be_bytes()[..], "κόσμε".as_bytes()].concat(),
        ));
    }
    for (case, payload) in &cases {
        let mut tcp = raw_websocket(server.addr, "/echo").await;
        tcp.write_all(&frame(FIN | CLOSE, payload, true))
            .await
            .unwrap();
        let (received, reset) = read_to_end(&mut tcp).await;
        assert_eq!(received, frame(FIN | CLOSE, payload, false), "{case}");
        assert!(!reset, "{case}: the connection was reset");
    }
}

/// Autobahn 7.9.x and RFC 6455 §7.4: codes that must not appear in a close
/// frame (reserved, or meant only for reporting) get 1002.
#[tokio::test]
async fn a_close_with_a_code_no_endpoint_may_send_gets_close_1002() {
    let server = TestServer::start(config()).await;
    for code in [
        0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        let mut tcp = raw_websocket(server.addr, "/echo").await;
        tcp.write_all(&frame(FIN | CLOSE, &code.to_be_bytes(), true))
            .await
            .unwrap();
        let (received, _) = read_to_end(&mut tcp).await;
        assert_eq!(
            sole_close_code(&received),
            Some(1002),
            "code {code}: got {received:02x?}"
        );
    }
}

/// Autobahn 7.1.2–7.1.5: once the client has closed, the server answers
/// nothing but the close, and ends the connection.
#[tokio::test]
async fn frames_after_the_clients_close_get_nothing_but_the_close_reply() {
    let server = TestServer::start(config()).await;
    let close = frame(FIN | CLOSE, &1000u16.to_be_bytes(), true);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "a text message after it",
            [close.clone(), frame(FIN | TEXT, b"too late", true)].concat(),
        ),
        (
            "a ping after it",
            [close.clone(), frame(FIN | PING, b"too late", true)].concat(),
        ),
        (
            "a second close after it",
            [
                close.clone(),
                frame(FIN | CLOSE, &1001u16.to_be_bytes(), true),
            ]
            .concat(),
        ),
        (
            "a fragment before it, the rest after it",
            [
                frame(TEXT, b"begun ", true),
                close.clone(),
                frame(FIN | CONTINUATION, b"too late", true),
            ]
            .concat(),
        ),
    ];
    let reply = frame(FIN | CLOSE, &1000u16.to_be_bytes(), false);
    for (case, bytes) in &cases {
        let mut tcp = raw_websocket(server.addr, "/echo").await;
        tcp.write_all(bytes).await.unwrap();
        let (received, _) = read_to_end(&mut tcp).await;
        assert_eq!(received, reply, "close with {case}");
    }
}

/// Autobahn 9.1.x–9.4.x (scaled to 1 MiB), many small fragments, and 10.1.1
/// (64 KiB in 1300-byte fragments).
#[tokio::test]
async fn large_messages_and_messages_of_many_fragments_are_echoed_intact() {
    const MIB: usize = 1024 * 1024;
    let server = TestServer::start(Config {
        max_message_size: 2 * MIB,
        ..config()
    })
    .await;
    let mut tcp = raw_websocket(server.addr, "/echo").await;
    let binary = payload_of(BINARY, MIB);
    // About 1 MiB; 1000-byte fragments split its code points.
    let text = "κόσμε 😀 ".repeat(MIB / 16).into_bytes();
    let small_text = "κόσμε 😀 ".repeat(500).into_bytes();
    let autobahn_10 = payload_of(TEXT, 65536);
    let cases: Vec<(&str, u8, &[u8], Vec<u8>)> = vec![
        (
            "1 MiB binary in one frame",
            BINARY,
            &binary[..],
            frame(FIN | BINARY, &binary, true),
        ),
        (
            "1 MiB text in one frame",
            TEXT,
            &text[..],
            frame(FIN | TEXT, &text, true),
        ),
        (
            "1 MiB binary in 64 KiB fragments",
            BINARY,
            &binary[..],
            fragmented(BINARY, &binary, 64 * 1024),
        ),
        (
            "1 MiB text in 1000-byte fragments",
            TEXT,
            &text[..],
            fragmented(TEXT, &text, 1000),
        ),
        (
            "binary in 1000 fragments of 10 bytes",
            BINARY,
            &binary[..10_000],
            fragmented(BINARY, &binary[..10_000], 10),
        ),
        (
            "text in fragments of 7 bytes",
            TEXT,
            &small_text[..],
            fragmented(TEXT, &small_text, 7),
        ),
        (
            "64 KiB text in 1300-byte fragments",
            TEXT,
            &autobahn_10[..],
            fragmented(TEXT, &autobahn_10, 1300),
        ),
    ];
    for (case, opcode, payload, wire) in &cases {
        tcp.write_all(wire).await.unwrap();
        expect_frame(&mut tcp, &frame(FIN | *opcode, payload, false), case).await;
    }
}
