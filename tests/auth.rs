//! Authentication at upgrade: tokens from every place a client can put
//! them, every way a token can be wrong, the permissions its claims grant,
//! and the close when it expires.

mod common;

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{config, raw_handshake, refused_flag, TestServer};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use wsproto::{opcode, proto::v1, Config, ErrorCode};
use wsproto_client::{Client, ClientError};

const SECRET: &str = "test-secret";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Claims for `alice`, valid for an hour, allowed `news.#` and `chat.*`.
fn claims() -> Value {
    json!({
        "sub": "alice",
        "exp": now() + 3600,
        "aud": "wsproto-test",
        "subscribe": ["news.#", "chat.*"],
        "publish": ["chat.*"],
        "rooms": ["team.*"],
    })
}

async fn start() -> TestServer {
    TestServer::start(Config {
        jwt_secret: Some(SECRET.into()),
        jwt_audience: Some("wsproto-test".into()),
        ..config()
    })
    .await
}

async fn status_with(server: &TestServer, path: &str, headers: &[(&str, &str)]) -> u16 {
    raw_handshake(server.addr, path, headers, None).await.0
}

#[tokio::test]
async fn missing_or_invalid_tokens_get_401_before_any_upgrade() {
    let server = start().await;
    let expired = hs256(
        json!({"sub": "alice", "exp": now() - 60, "aud": "wsproto-test"}),
        SECRET,
    );
    let immature = hs256(
        json!({"sub": "alice", "exp": now() + 3600, "nbf": now() + 600, "aud": "wsproto-test"}),
        SECRET,
    );
    let wrong_audience = hs256(
        json!({"sub": "alice", "exp": now() + 3600, "aud": "other"}),
        SECRET,
    );
    let bad_signature = hs256(claims(), "another-secret");
    let bad_claims = hs256(
        json!({"sub": "alice", "exp": now() + 3600, "aud": "wsproto-test", "subscribe": ["a..b"]}),
        SECRET,
    );
    for (token, reason) in [
        (None, "missing token"),
        (Some("not.a.token"), "malformed token"),
        (Some(bad_signature.as_str()), "invalid token signature"),
        (Some(expired.as_str()), "token expired"),
        (Some(immature.as_str()), "token not valid yet"),
        (Some(wrong_audience.as_str()), "another audience"),
        (Some(bad_claims.as_str()), "claims are invalid"),
    ] {
        let path = match token {
            Some(token) => format!("/ws?token={token}"),
            None => "/ws".to_owned(),
        };
        match Client::connect(&format!("ws://{}{path}", server.addr)).await {
            Err(ClientError::Refused { status, body }) => {
                assert_eq!(status, 401, "{reason}");
                assert!(body.contains(reason), "{reason}: {body}");
            }
            other => panic!("{reason}: expected 401, got {:?}", other.map(|_| ())),
        }
    }
    assert!(server.hub.is_empty(), "nothing was registered");
    assert_eq!(server.node.counter_snapshot().refused_auth, 7);
}

#[tokio::test]
async fn a_token_works_from_the_header_a_cookie_or_the_query() {
    let server = start().await;
    let token = hs256(claims(), SECRET);
    let mut client = Client::connect_with_token(&server.url(), None, Some(&token))
        .await
        .unwrap();
    assert_eq!(client.welcome().await.unwrap().user_id, "alice");
    let bearer = format!("Bearer {token}");
    let cookie = format!("theme=dark; wsproto_token={token}");
    assert_eq!(
        status_with(&server, "/ws", &[("Authorization", &bearer)]).await,
        101
    );
    assert_eq!(
        status_with(&server, "/ws", &[("Cookie", &cookie)]).await,
        101
    );
    assert_eq!(
        status_with(&server, &format!("/ws?token={token}"), &[]).await,
        101
    );
    assert_eq!(
        status_with(&server, "/echo", &[]).await,
        401,
        "every WebSocket needs a token"
    );
}

#[tokio::test]
async fn claims_decide_the_user_and_what_it_may_subscribe_and_publish() {
    let server = start().await;
    let token = hs256(claims(), SECRET);
    // ?user= cannot override the verified identity.
    let mut alice = Client::connect(&format!("{}?token={token}&user=mallory", server.url()))
        .await
        .unwrap();
    let welcome = alice.welcome().await.unwrap();
    assert_eq!(welcome.user_id, "alice");

    alice.subscribe(&["news.#", "chat.general"]).await.unwrap();
    for forbidden in ["alarm.fire", "#", "chat.a.b"] {
        match alice.subscribe(&[forbidden]).await {
            Err(ClientError::ErrorFrame { code, .. }) => {
                assert_eq!(code, ErrorCode::PermissionDenied.as_u32())
            }
            other => panic!("{forbidden}: {other:?}"),
        }
    }
    alice.publish("chat.general", "hello").await.unwrap();
    alice.join("team.red", false).await.unwrap();
    match alice.join("lobby", false).await {
        Err(ClientError::ErrorFrame { code, .. }) => {
            assert_eq!(code, ErrorCode::PermissionDenied.as_u32())
        }
        other => panic!("{other:?}"),
    }
    match alice.publish("news.today", "fake news").await {
        Err(ClientError::ErrorFrame { code, .. }) => {
            assert_eq!(code, ErrorCode::PermissionDenied.as_u32())
        }
        other => panic!("{other:?}"),
    }
    // The URL cannot subscribe past the claims either.
    match Client::connect(&format!(
        "{}?token={token}&subscribe=alarm.%23",
        server.url()
    ))
    .await
    {
        Err(ClientError::Refused { status, .. }) => assert_eq!(status, 403),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn a_session_is_closed_with_4001_when_its_token_expires() {
    let server = start().await;
    let token = hs256(
        json!({"sub": "alice", "exp": now() + 2, "aud": "wsproto-test"}),
        SECRET,
    );
    let mut client = Client::connect(&format!("{}?token={token}", server.url()))
        .await
        .unwrap();
    client.welcome().await.unwrap();
    match client.recv_timeout(Duration::from_secs(10)).await {
        Err(ClientError::Closed { code, .. }) => assert_eq!(code, 4001),
        other => panic!("expected close 4001, got {other:?}"),
    }
    server.wait_for_sessions(0).await;
}

#[tokio::test]
async fn refresh_token_keeps_a_session_past_its_first_token() {
    let server = start().await;
    let token = |sub: &str, lifetime: u64| {
        hs256(
            json!({"sub": sub, "exp": now() + lifetime, "aud": "wsproto-test", "subscribe": ["news.#"]}),
            SECRET,
        )
    };
    let mut client = Client::connect(&format!("{}?token={}", server.url(), token("alice", 2)))
        .await
        .unwrap();
    client.welcome().await.unwrap();

    let refresh = |token: String| v1::RefreshToken { token };
    let refreshed: v1::TokenRefreshed = client
        .request(opcode::REFRESH_TOKEN, &refresh(token("alice", 60)))
        .await
        .unwrap();
    let expected_ms = (now() + 60) * 1000;
    assert!(
        refreshed.expires_at_ms.abs_diff(expected_ms) <= 2000,
        "{refreshed:?}"
    );

    // Refusals leave the session and its current token alone.
    for (bad, why) in [
        (token("mallory", 60), "another user"),
        (
            hs256(
                json!({"sub": "alice", "exp": now() + 60, "aud": "wsproto-test"}),
                "wrong",
            ),
            "bad signature",
        ),
        (token("alice", 0).replace('.', "!"), "garbage"),
    ] {
        match client
            .request::<v1::TokenRefreshed>(opcode::REFRESH_TOKEN, &refresh(bad))
            .await
        {
            Err(ClientError::ErrorFrame { code, .. }) => {
                assert_eq!(code, ErrorCode::InvalidToken.as_u32(), "{why}")
            }
            other => panic!("{why}: expected INVALID_TOKEN, got {other:?}"),
        }
    }

    // Past the first token's expiry the session is still served...
    tokio::time::sleep(Duration::from_secs(4)).await;
    let reply = client.call(opcode::ECHO, "still here").await.unwrap();
    assert_eq!(reply.payload, "still here");

    // ...and a refreshed token that expires soon closes it with 4001 then.
    let _: v1::TokenRefreshed = client
        .request(opcode::REFRESH_TOKEN, &refresh(token("alice", 1)))
        .await
        .unwrap();
    match client.recv_timeout(Duration::from_secs(10)).await {
        Err(ClientError::Closed { code, .. }) => assert_eq!(code, 4001),
        other => panic!("expected close 4001, got {other:?}"),
    }
    server.wait_for_sessions(0).await;
}

#[tokio::test]
async fn refresh_token_in_insecure_mode_is_refused() {
    let server = TestServer::start(config()).await;
    let mut client = server.client().await;
    let refresh = v1::RefreshToken {
        token: "anything".into(),
    };
    match client
        .request::<v1::TokenRefreshed>(opcode::REFRESH_TOKEN, &refresh)
        .await
    {
        Err(ClientError::ErrorFrame { code, message, .. }) => {
            assert_eq!(code, ErrorCode::InvalidToken.as_u32());
            assert!(message.contains("insecure mode"), "{message}");
        }
        other => panic!("expected INVALID_TOKEN, got {other:?}"),
    }
}

/// A server verifying with `<name>-public.pem` accepts tokens signed with
/// `<name>-private.pem` and refuses a wrong issuer and an HS256 token.
async fn public_key_tokens_are_verified(name: &str, algorithm: Algorithm) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let public = fixtures.join(format!("{name}-public.pem"));
    let server = TestServer::start(Config {
        jwt_public_key: Some(public.to_string_lossy().into_owned()),
        jwt_issuer: Some("https://auth.example.com".into()),
        ..config()
    })
    .await;
    let private = std::fs::read(fixtures.join(format!("{name}-private.pem"))).unwrap();
    let key = match algorithm {
        Algorithm::ES256 => EncodingKey::from_ec_pem(&private),
        _ => EncodingKey::from_rsa_pem(&private),
    }
    .unwrap();
    let sign =
        |claims: Value| jsonwebtoken::encode(&Header::new(algorithm), &claims, &key).unwrap();
    let good = sign(json!({"sub": "bob", "exp": now() + 60, "iss": "https://auth.example.com"}));
    let wrong_issuer =
        sign(json!({"sub": "bob", "exp": now() + 60, "iss": "https://evil.example.com"}));
    let hs = hs256(
        json!({"sub": "bob", "exp": now() + 60, "iss": "https://auth.example.com"}),
        SECRET,
    );

    let mut bob = Client::connect(&format!("{}?token={good}", server.url()))
        .await
        .unwrap();
    assert_eq!(bob.welcome().await.unwrap().user_id, "bob");
    assert_eq!(
        status_with(&server, &format!("/ws?token={wrong_issuer}"), &[]).await,
        401
    );
    assert_eq!(
        status_with(&server, &format!("/ws?token={hs}"), &[]).await,
        401,
        "no algorithm switching"
    );
}

#[tokio::test]
async fn es256_tokens_are_verified_with_a_public_key_file() {
    public_key_tokens_are_verified("es256", Algorithm::ES256).await;
}

#[tokio::test]
async fn rs256_tokens_are_verified_with_a_public_key_file() {
    public_key_tokens_are_verified("rs256", Algorithm::RS256).await;
}

#[tokio::test]
async fn bad_key_settings_are_start_up_errors() {
    let both = Config {
        jwt_secret: Some("s".into()),
        jwt_public_key: Some("k.pem".into()),
        ..config()
    };
    assert_eq!(refused_flag(both).await, Some("--jwt-secret"));
    let missing = Config {
        jwt_public_key: Some("/nonexistent.pem".into()),
        ..config()
    };
    assert_eq!(refused_flag(missing).await, Some("--jwt-public-key"));
    let empty = Config {
        jwt_secret: Some(String::new()),
        ..config()
    };
    assert_eq!(refused_flag(empty).await, Some("--jwt-secret"));
}
