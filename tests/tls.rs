//! `wss://`: the server terminates TLS with a certificate generated here;
//! the client trusts it through `--ca-file` and refuses it without.

mod common;

use std::path::PathBuf;

use common::{config, refused_flag, TestServer};
use wsproto::{opcode, Config};
use wsproto_client::{tls_config, Client, ClientError};

/// A self-signed certificate for 127.0.0.1 and localhost, written as PEM
/// files: (certificate, key).
fn certificate() -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let cert = params.self_signed(&key).unwrap();
    let dir = std::env::temp_dir().join(format!(
        "wsproto-tls-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

#[tokio::test]
async fn wss_with_a_private_ca_and_refusal_without_it() {
    let (cert, key) = certificate();
    let server = TestServer::start(Config {
        tls_cert: Some(cert.clone()),
        tls_key: Some(key),
        ..config()
    })
    .await;
    let url = format!("wss://{}/ws", server.addr);

    let trusted = tls_config(Some(&cert)).unwrap();
    let mut client = Client::connect_with(&url, Some(trusted)).await.unwrap();
    client.welcome().await.unwrap();
    assert_eq!(
        client.call(opcode::ECHO, "over TLS").await.unwrap().payload,
        "over TLS"
    );

    // The public roots alone do not trust a private certificate.
    let untrusted = tls_config(None).unwrap();
    assert!(Client::connect_with(&url, Some(untrusted)).await.is_err());
    // Plain ws:// to a TLS port does not get a session either.
    assert!(Client::connect(&format!("ws://{}/ws", server.addr))
        .await
        .is_err());
    drop(client);
    server.wait_for_sessions(0).await;
}

#[tokio::test]
async fn unusable_tls_files_are_start_up_errors() {
    let (cert, key) = certificate();
    let tls = |cert: &PathBuf, key: &PathBuf| Config {
        tls_cert: Some(cert.clone()),
        tls_key: Some(key.clone()),
        ..config()
    };
    assert_eq!(refused_flag(tls(&cert, &key)).await, None);
    assert!(
        refused_flag(tls(&key, &cert)).await.is_some(),
        "swapped files"
    );
    assert_eq!(
        refused_flag(tls(&cert, &PathBuf::from("/nonexistent"))).await,
        Some("--tls-key")
    );
    assert!(
        matches!(tls_config(Some(&key)), Err(ClientError::Tls(_))),
        "a key is not a CA"
    );
}
