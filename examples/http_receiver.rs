//! A minimal HTTP receiver for `bench/http.sh`: answers every request 200 at once, after reading
//! its body. Prints its port on stdout, then serves until killed; on SIGTERM it prints the
//! requests and body bytes it received on stderr.
//!
//!   cargo run --release --example http_receiver [PORT]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("{}", listener.local_addr()?.port());
    let requests = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = term.recv() => break,
        };
        let (requests, bytes) = (requests.clone(), bytes.clone());
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (requests, bytes) = (requests.clone(), bytes.clone());
                    async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        requests.fetch_add(1, Ordering::Relaxed);
                        bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                        Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from_static(
                            b"OK",
                        ))))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
    eprintln!(
        "http_receiver: {} requests, {} body bytes",
        requests.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed)
    );
    Ok(())
}
