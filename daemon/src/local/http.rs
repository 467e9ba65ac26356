//! A small HTTP/1.1 endpoint (no HTTP stack, no second TLS provider pulled
//! in): `GET /metrics` (Prometheus text) and the admin API ([`Admin`]).
//! Bind it to a trusted address: the admin API changes how the group
//! closes steps.

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, info};

use super::admin::Admin;

/// Serves `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: PrometheusHandle, admin: Admin) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics endpoint listening");
    }
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else {
            continue;
        };
        let (metrics, admin) = (metrics.clone(), admin.clone());
        tokio::spawn(async move {
            let mut req = [0u8; 1024];
            let n = match stream.read(&mut req).await {
                Ok(n) => n,
                Err(_) => return,
            };
            let text = String::from_utf8_lossy(&req[..n]);
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let mut words = head.lines().next().unwrap_or("").split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let (status, body) = match (method, path) {
                ("GET", "/metrics") => ("200 OK", metrics.render()),
                _ => match admin.handle(method, path, body).await {
                    Some(answer) => answer,
                    None => (
                        "404 Not Found",
                        "only GET /metrics, GET /members, GET /policy and POST /policy are served\n"
                            .to_string(),
                    ),
                },
            };
            debug!(%peer, status, "http request");
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
        });
    }
}
