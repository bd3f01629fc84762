//! A minimal HTTP/1.1 client for the server's HTTP endpoints (the publish
//! API), on hyper.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why an HTTP request failed before any status came back.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid URL {0:?}: expected http://HOST:PORT/PATH")]
    Url(String),
    #[error("cannot connect to {url}: {error}")]
    Connect { url: String, error: std::io::Error },
    #[error("HTTP request failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("invalid request: {0}")]
    Request(#[from] hyper::http::Error),
}

/// Sends a POST with a JSON body and returns the status and the body.
///
/// # Errors
/// When the URL is not `http://…`, the server is unreachable or the
/// exchange fails.
pub async fn post_json(
    url: &str,
    bearer: Option<&str>,
    json: &str,
) -> Result<(StatusCode, Bytes), HttpError> {
    let uri: Uri = url.parse().map_err(|_| HttpError::Url(url.to_owned()))?;
    let authority = match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(authority)) => authority.clone(),
        _ => return Err(HttpError::Url(url.to_owned())),
    };
    let port = authority.port_u16().unwrap_or(80);
    let tcp = TcpStream::connect((authority.host().trim_matches(['[', ']']), port))
        .await
        .map_err(|error| HttpError::Connect {
            url: url.to_owned(),
            error,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(connection);

    let mut request = Request::post(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(token) = bearer {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::from(json.to_owned())))?)
        .await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}
