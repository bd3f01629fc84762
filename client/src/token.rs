//! `wsproto-client token`: signed JWTs for development and tests, so a
//! server started with `--jwt-secret` can be tried without writing HS256
//! signing by hand.
//!
//! The claims are exactly those the server reads (`src/auth.rs`): `sub`
//! (the user), `exp`, the topic patterns it may `subscribe` and `publish`
//! to, the `rooms` it may join, and `aud`/`iss` for servers that require
//! them. A list left out grants nothing, as on the server.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Map, Value};
use wsproto::topic::Topic;

use crate::Usage;

#[derive(Args)]
pub struct TokenArgs {
    /// The server's --jwt-secret (HS256).
    #[arg(
        long,
        env = "WSPROTO_JWT_SECRET",
        hide_env_values = true,
        help_heading = "Signing"
    )]
    secret: String,

    /// How long the token is valid (e.g. 1h, 15m, 7d).
    #[arg(long, default_value = "1h", value_parser = crate::parse_period, help_heading = "Signing")]
    ttl: Duration,

    /// `aud` claim, for a server started with --jwt-audience.
    #[arg(long, help_heading = "Signing")]
    aud: Option<String>,

    /// `iss` claim, for a server started with --jwt-issuer.
    #[arg(long, help_heading = "Signing")]
    iss: Option<String>,

    /// The user id (`sub`).
    #[arg(long, help_heading = "Claims")]
    user: String,

    /// Topic pattern the user may subscribe to (e.g. `alarm.#`); repeatable.
    #[arg(long = "subscribe", help_heading = "Claims")]
    subscribe: Vec<String>,

    /// Topic pattern the user may PUBLISH to over WebSocket; repeatable.
    #[arg(long = "publish", help_heading = "Claims")]
    publish: Vec<String>,

    /// Room (or room pattern) the user may join; repeatable.
    #[arg(long = "join", help_heading = "Claims")]
    rooms: Vec<String>,
}

/// The signed token `args` describe.
///
/// # Errors
/// [`Usage`] when the secret or user is empty or a pattern is invalid
/// (the server would refuse such a token).
pub fn mint(args: &TokenArgs) -> Result<String, Usage> {
    if args.secret.is_empty() {
        return Err(Usage(
            "--secret is empty; give the server's --jwt-secret".into(),
        ));
    }
    if args.user.is_empty() {
        return Err(Usage("--user is empty; give the user id".into()));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut claims = Map::new();
    claims.insert("sub".into(), json!(args.user));
    claims.insert("exp".into(), json!((now + args.ttl).as_secs()));
    for (claim, flag, patterns) in [
        ("subscribe", "--subscribe", &args.subscribe),
        ("publish", "--publish", &args.publish),
        ("rooms", "--join", &args.rooms),
    ] {
        for pattern in patterns {
            Topic::parse(pattern).map_err(|err| Usage(format!("{flag} {pattern:?}: {err}")))?;
        }
        if !patterns.is_empty() {
            claims.insert(claim.into(), json!(patterns));
        }
    }
    if let Some(aud) = &args.aud {
        claims.insert("aud".into(), json!(aud));
    }
    if let Some(iss) = &args.iss {
        claims.insert("iss".into(), json!(iss));
    }
    let key = EncodingKey::from_secret(args.secret.as_bytes());
    jsonwebtoken::encode(&Header::default(), &Value::Object(claims), &key)
        .map_err(|err| Usage(format!("cannot sign the token: {err}")))
}
