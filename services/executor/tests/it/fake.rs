//! A local HTTP server that plays MIOSA: each route answers from a script of canned responses
//! (the last one repeats), and every request is logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(Clone)]
pub struct Canned {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(&'static str, String)>,
    pub delay: Duration,
}

pub fn reply(status: u16, body: &str) -> Canned {
    Canned {
        status,
        body: body.to_string(),
        headers: Vec::new(),
        delay: Duration::ZERO,
    }
}

#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: String,
}

#[derive(Clone, Default)]
pub struct Fake {
    script: Arc<Mutex<HashMap<String, Vec<Canned>>>>,
    pub log: Arc<Mutex<Vec<Logged>>>,
}

impl Fake {
    /// Scripts `METHOD /path` (relative to `/api/v1`).
    pub fn on(&self, route: &str, answers: Vec<Canned>) {
        self.script
            .lock()
            .unwrap()
            .insert(route.to_string(), answers);
    }

    pub fn requests(&self, route: &str) -> Vec<Logged> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| format!("{} {}", l.method, l.path) == route)
            .cloned()
            .collect()
    }

    /// Serves on a random loopback port; returns the base URL.
    pub async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/api/v1")
    }
}

async fn handle(State(fake): State<Fake>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body: Bytes = axum::body::to_bytes(body, 64 << 20).await.unwrap();
    let path = parts.uri.path().trim_start_matches("/api/v1").to_string();
    let route = format!("{} {}", parts.method, path);
    fake.log.lock().unwrap().push(Logged {
        method: parts.method.to_string(),
        path,
        headers: parts.headers.clone(),
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    let canned = {
        let mut script = fake.script.lock().unwrap();
        match script.get_mut(&route) {
            Some(list) if list.len() > 1 => Some(list.remove(0)),
            Some(list) => list.first().cloned(),
            None => None,
        }
    };
    let Some(c) = canned else {
        return (
            StatusCode::NOT_FOUND,
            r#"{"error":{"code":"route_not_found","message":"no such route"}}"#,
        )
            .into_response();
    };
    tokio::time::sleep(c.delay).await;
    let mut resp = (StatusCode::from_u16(c.status).unwrap(), c.body).into_response();
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    for (k, v) in c.headers {
        resp.headers_mut().insert(k, v.parse().unwrap());
    }
    resp
}
