//! A minimal HTTP/1.1 client for the server's HTTP endpoints (the publish
//! API), on hyper: one-shot requests, and a keep-alive connection for the
//! many requests of a benchmark.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{client::conn::http1::SendRequest, Request, StatusCode, Uri};
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
    post_json_with(url, bearer, json, &[]).await
}

/// [`post_json`] with extra request headers (e.g. `Idempotency-Key`).
///
/// # Errors
/// As [`post_json`].
pub async fn post_json_with(
    url: &str,
    bearer: Option<&str>,
    json: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, Bytes), HttpError> {
    KeepAlive::connect(url)
        .await?
        .post_json_with(bearer, json, headers)
        .await
}

/// One keep-alive HTTP/1.1 connection to the server of a URL, for POSTs to
/// that URL's path.
///
/// A server may close an idle keep-alive connection between requests (the
/// wsproto server does after its handshake timeout); the connection is then
/// opened again, and a request that never went out is sent on the new one.
pub struct KeepAlive {
    url: String,
    host: String,
    port: u16,
    authority: String,
    path: String,
    sender: SendRequest<Full<Bytes>>,
}

impl KeepAlive {
    /// Connects to the host and port of `url` (`http://HOST:PORT/PATH`).
    ///
    /// # Errors
    /// When the URL is not `http://…` or the server is unreachable.
    pub async fn connect(url: &str) -> Result<KeepAlive, HttpError> {
        let uri: Uri = url.parse().map_err(|_| HttpError::Url(url.to_owned()))?;
        let authority = match (uri.scheme_str(), uri.authority()) {
            (Some("http"), Some(authority)) => authority.clone(),
            _ => return Err(HttpError::Url(url.to_owned())),
        };
        let host = authority.host().trim_matches(['[', ']']).to_owned();
        let port = authority.port_u16().unwrap_or(80);
        let sender = open(url, &host, port).await?;
        Ok(KeepAlive {
            url: url.to_owned(),
            host,
            port,
            authority: authority.as_str().to_owned(),
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
            sender,
        })
    }

    /// Sends a POST with a JSON body and returns the status and the body.
    ///
    /// # Errors
    /// When the connection cannot be opened again or the exchange fails.
    pub async fn post_json(
        &mut self,
        bearer: Option<&str>,
        json: &str,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        self.post_json_with(bearer, json, &[]).await
    }

    /// [`KeepAlive::post_json`] with extra request headers.
    ///
    /// # Errors
    /// As [`KeepAlive::post_json`].
    pub async fn post_json_with(
        &mut self,
        bearer: Option<&str>,
        json: &str,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, Bytes), HttpError> {
        let body = Bytes::copy_from_slice(json.as_bytes());
        let request = || {
            let mut request = Request::post(self.path.as_str())
                .header(hyper::header::HOST, self.authority.as_str())
                .header(hyper::header::CONTENT_TYPE, "application/json");
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            if let Some(token) = bearer {
                request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
            }
            request.body(Full::new(body.clone()))
        };
        if self.sender.ready().await.is_err() {
            self.sender = open(&self.url, &self.host, self.port).await?;
        }
        let response = match self.sender.send_request(request()?).await {
            // Closed under us before the request went out: it is safe to
            // send again on a new connection.
            Err(err) if err.is_canceled() => {
                self.sender = open(&self.url, &self.host, self.port).await?;
                self.sender.send_request(request()?).await?
            }
            result => result?,
        };
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

async fn open(url: &str, host: &str, port: u16) -> Result<SendRequest<Full<Bytes>>, HttpError> {
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|error| HttpError::Connect {
            url: url.to_owned(),
            error,
        })?;
    tcp.set_nodelay(true).map_err(|error| HttpError::Connect {
        url: url.to_owned(),
        error,
    })?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    Ok(sender)
}
