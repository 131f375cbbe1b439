//! A small client for the tests: JSON in, status and JSON out.

use serde_json::{Value, json};
use slipway_test_support::Sandboxd;

pub const BIN: &str = env!("CARGO_BIN_EXE_slipway-sandboxd");

pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(sd: &Sandboxd) -> Self {
        Self {
            base: sd.base_url().to_string(),
            http: slipway_test_support::http(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, self.url(path))
            .header("Authorization", "Bearer msk_test_key");
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, value)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::DELETE, path, None).await
    }

    /// Creates a sandbox and returns its id.
    pub async fn create(&self, body: Value) -> String {
        let (status, v) = self.post("/sandboxes", body).await;
        assert_eq!(status, 201, "{v}");
        v["data"]["id"].as_str().unwrap().to_string()
    }

    pub async fn sandbox(&self) -> String {
        self.create(json!({ "template_id": "node", "external_user_id": "u1" }))
            .await
    }

    /// Runs a command; returns (exit code, stdout, stderr).
    pub async fn exec(&self, id: &str, command: &str) -> (i64, String, String) {
        let (status, v) = self
            .post(
                &format!("/sandboxes/{id}/exec"),
                json!({ "command": command }),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        let d = &v["data"];
        (
            d["exit_code"].as_i64().unwrap(),
            d["stdout"].as_str().unwrap().to_string(),
            d["stderr"].as_str().unwrap().to_string(),
        )
    }

    pub async fn download(&self, id: &str, path: &str) -> (u16, Vec<u8>) {
        let resp = self
            .http
            .get(self.url(&format!("/sandboxes/{id}/fs/download")))
            .query(&[("path", path)])
            .header("Authorization", "Bearer msk_test_key")
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.bytes().await.unwrap().to_vec())
    }

    /// Counts sandboxes at the platform, by listing them.
    pub async fn count(&self, query: &str) -> usize {
        let (status, v) = self.get(&format!("/sandboxes{query}")).await;
        assert_eq!(status, 200, "{v}");
        v["data"].as_array().unwrap().len()
    }
}
