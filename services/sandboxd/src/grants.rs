//! Grants: what lets a browser reach a sandbox port through the edge. A grant is minted by the
//! API (a preview token, a preview's standing URL, a preview share, a sandbox share), kept on
//! disk with its revocation, and shown to the world two ways, both keyed by sandboxd's secret:
//!
//! - a token (`mp_…`, `miosa_pv_…`, `ms_…`): signed claims naming the grant, its audience,
//!   sandbox, port and expiry, which MIOSA clients carry in a query parameter or header;
//! - a capability host name, `<port>-<sandbox>-<secret>`, under the edge's preview domain. Browsers
//!   send no third-party cookies from inside a cross-site iframe, so the host name itself is the
//!   credential, and every request of the page (scripts, styles, WebSockets) carries it.
//!
//! Every request is checked against the live record, so expiry and revocation take effect at once
//! and survive a restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::clock::now_ms;
use crate::store;

type HmacSha256 = Hmac<Sha256>;

/// What a grant is for; each has its own token prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Audience {
    /// `POST /sandboxes/{id}/preview-token`: a short-lived iframe token.
    PreviewToken,
    /// The standing URL of a preview made with `POST /sandboxes/{id}/previews`.
    Preview,
    /// `POST …/previews/{preview_id}/share`: a public link to one preview.
    PreviewShare,
    /// `POST /sandboxes/{id}/shares`: a public read-only link to the sandbox's app.
    SandboxShare,
}

impl Audience {
    pub fn prefix(self) -> &'static str {
        match self {
            Audience::PreviewToken => "mp_",
            Audience::Preview => "mpv_",
            Audience::PreviewShare => "miosa_pv_",
            Audience::SandboxShare => "ms_",
        }
    }

    /// The query parameter MIOSA puts the token in.
    pub fn query_key(self) -> &'static str {
        match self {
            Audience::PreviewToken | Audience::Preview => "mt",
            Audience::PreviewShare => "preview_token",
            Audience::SandboxShare => "ms",
        }
    }

    fn from_token(token: &str) -> Option<(Audience, &str)> {
        // Longest prefixes first: `mpv_` before `mp_`.
        [
            Audience::PreviewShare,
            Audience::Preview,
            Audience::PreviewToken,
            Audience::SandboxShare,
        ]
        .into_iter()
        .find_map(|a| token.strip_prefix(a.prefix()).map(|rest| (a, rest)))
    }
}

/// `read` allows looking (GET, HEAD, OPTIONS, WebSockets); `interact` allows every method.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    #[default]
    Read,
    Interact,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "interact" => Some(Scope::Interact),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Interact => "interact",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Grant {
    pub id: String,
    pub audience: Audience,
    pub sandbox_id: String,
    pub port: u16,
    pub scope: Scope,
    /// The preview a `Preview` or `PreviewShare` grant belongs to.
    pub preview_id: Option<String>,
    /// A preview's name and visibility, as given when it was made.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub visibility: Option<String>,
    pub created_at_ms: i64,
    /// The request's `Idempotency-Key` (with its audience and sandbox), so a retried create
    /// answers this grant instead of minting a second capability.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// What that request asked for, so the same key with another request is refused.
    #[serde(default)]
    pub idempotency_body: Option<String>,
    /// None: until revoked (or its sandbox is destroyed).
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
}

impl Grant {
    pub fn new(audience: Audience, sandbox_id: &str, port: u16, scope: Scope) -> Self {
        let id = match audience {
            Audience::PreviewToken => new_id("ptk"),
            Audience::Preview => new_id("pv"),
            Audience::PreviewShare => new_id("pvs"),
            Audience::SandboxShare => new_id("shr"),
        };
        Self {
            id,
            audience,
            sandbox_id: sandbox_id.to_string(),
            port,
            scope,
            preview_id: None,
            name: None,
            visibility: None,
            created_at_ms: now_ms(),
            idempotency_key: None,
            idempotency_body: None,
            expires_at_ms: None,
            revoked_at_ms: None,
        }
    }

    pub fn active(&self, now_ms: i64) -> bool {
        self.revoked_at_ms.is_none() && self.expires_at_ms.is_none_or(|e| e > now_ms)
    }
}

/// What `insert_once` did.
pub enum Once {
    /// A new grant, recorded.
    Made(Grant),
    /// The grant an earlier request with the same key made.
    Seen(Grant),
    /// The key was used with another request.
    Reused,
}

/// Why the edge turns a request away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this link is not valid")]
    Forged,
    #[error("this link has expired")]
    Expired,
    #[error("this link was revoked")]
    Revoked,
    #[error("this link is for another sandbox or port")]
    Mismatch,
}

/// The claims a token carries; the grant record stays the source of truth.
#[derive(Serialize, Deserialize, PartialEq)]
struct Claims {
    gid: String,
    aud: Audience,
    sbx: String,
    port: u16,
    exp: Option<i64>,
}

#[derive(Default, Serialize, Deserialize)]
struct Saved {
    grants: Vec<Grant>,
}

struct Table {
    by_id: HashMap<String, Grant>,
    /// Host-name secret -> grant id.
    by_secret: HashMap<String, String>,
}

pub struct Grants {
    key: [u8; 32],
    path: PathBuf,
    table: Mutex<Table>,
}

/// How long an expired or revoked grant is kept, so its link still says why it stopped working.
const KEEP_AFTER_END_MS: i64 = 7 * 24 * 3600 * 1000;

impl Grants {
    /// Opens (or starts) the grant records under `data_dir/edge`, with the signing key made on
    /// first start (readable only by sandboxd's user).
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let dir = data_dir.join("edge");
        std::fs::create_dir_all(&dir)?;
        let key_path = dir.join("signing.key");
        let key = match std::fs::read(&key_path) {
            Ok(bytes) => <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
                std::io::Error::other(format!("{} is not a 32-byte key", key_path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key: [u8; 32] = rand::random();
                store::write_atomic(&key_path, &key)?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
                key
            }
            Err(e) => return Err(e),
        };
        let path = dir.join("grants.json");
        let saved: Saved = store::read_json(&path)?.unwrap_or_default();
        let grants = Self {
            key,
            path,
            table: Mutex::new(Table {
                by_id: HashMap::new(),
                by_secret: HashMap::new(),
            }),
        };
        {
            let mut t = grants.lock();
            for g in saved.grants {
                t.by_secret.insert(grants.secret(&g.id), g.id.clone());
                t.by_id.insert(g.id.clone(), g);
            }
        }
        Ok(grants)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        // A 32-byte key is always a valid HMAC key.
        let mut mac = match HmacSha256::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }

    /// The unguessable part of a grant's host name (128 bits, lower-case hex: host names are
    /// case-insensitive).
    fn secret(&self, id: &str) -> String {
        crate::host::hex(&self.mac(&[b"host\0", id.as_bytes()])[..16])
    }

    /// `<port>-<sandbox suffix>-<secret>`: one DNS label (at most 63 characters).
    pub fn host_label(&self, grant: &Grant) -> String {
        format!("{}{}", label_prefix(grant), self.secret(&grant.id))
    }

    /// The grant's token: `<prefix><claims>.<signature>`, both base64url.
    pub fn token(&self, grant: &Grant) -> String {
        let claims = Claims {
            gid: grant.id.clone(),
            aud: grant.audience,
            sbx: grant.sandbox_id.clone(),
            port: grant.port,
            exp: grant.expires_at_ms,
        };
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let sig = URL_SAFE_NO_PAD.encode(self.mac(&[b"token\0", body.as_bytes()]));
        format!("{}{body}.{sig}", grant.audience.prefix())
    }

    /// Records a new grant (on disk before it is handed out).
    pub fn insert(&self, grant: Grant) -> std::io::Result<Grant> {
        let mut t = self.lock();
        t.by_secret.insert(self.secret(&grant.id), grant.id.clone());
        t.by_id.insert(grant.id.clone(), grant.clone());
        self.save(&mut t)?;
        Ok(grant)
    }

    /// Records `grant` unless a grant of the same audience and sandbox was made under
    /// `idempotency_key`: then that one is answered (the first request wins, as MIOSA's
    /// `Idempotency-Key` promises for every mutation), or `Reused` when that request differed
    /// (`body` is what identifies a request: its fields that shape the grant).
    pub fn insert_once(
        &self,
        mut grant: Grant,
        idempotency_key: Option<&str>,
        body: &str,
    ) -> std::io::Result<Once> {
        let Some(key) = idempotency_key else {
            return self.insert(grant).map(Once::Made);
        };
        let mut t = self.lock();
        let seen = t.by_id.values().find(|g| {
            g.idempotency_key.as_deref() == Some(key)
                && g.audience == grant.audience
                && g.sandbox_id == grant.sandbox_id
        });
        if let Some(seen) = seen {
            return Ok(if seen.idempotency_body.as_deref() == Some(body) {
                Once::Seen(seen.clone())
            } else {
                Once::Reused
            });
        }
        grant.idempotency_key = Some(key.to_string());
        grant.idempotency_body = Some(body.to_string());
        t.by_secret.insert(self.secret(&grant.id), grant.id.clone());
        t.by_id.insert(grant.id.clone(), grant.clone());
        self.save(&mut t)?;
        Ok(Once::Made(grant))
    }

    /// Revokes every active grant `which` picks; returns them.
    pub fn revoke(&self, which: impl Fn(&Grant) -> bool) -> std::io::Result<Vec<Grant>> {
        let now = now_ms();
        let mut t = self.lock();
        let mut revoked = Vec::new();
        for g in t.by_id.values_mut() {
            if g.revoked_at_ms.is_none() && which(g) {
                g.revoked_at_ms = Some(now);
                revoked.push(g.clone());
            }
        }
        if !revoked.is_empty() {
            self.save(&mut t)?;
        }
        Ok(revoked)
    }

    /// The grants `which` picks, oldest first.
    pub fn list(&self, which: impl Fn(&Grant) -> bool) -> Vec<Grant> {
        let t = self.lock();
        let mut out: Vec<Grant> = t.by_id.values().filter(|g| which(g)).cloned().collect();
        out.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        out
    }

    pub fn get(&self, id: &str) -> Option<Grant> {
        self.lock().by_id.get(id).cloned()
    }

    fn save(&self, t: &mut Table) -> std::io::Result<()> {
        let now = now_ms();
        let stale: Vec<String> = t
            .by_id
            .values()
            .filter(|g| {
                let ended = g.revoked_at_ms.or(g.expires_at_ms.filter(|e| *e <= now));
                ended.is_some_and(|e| now - e > KEEP_AFTER_END_MS)
            })
            .map(|g| g.id.clone())
            .collect();
        for id in stale {
            t.by_id.remove(&id);
            t.by_secret.remove(&self.secret(&id));
        }
        let mut grants: Vec<Grant> = t.by_id.values().cloned().collect();
        grants.sort_by(|a, b| a.id.cmp(&b.id));
        store::write_json(&self.path, &Saved { grants })
    }

    /// The grant a capability host label stands for, if it is live.
    pub fn check_host_label(&self, label: &str) -> Result<Grant, Refusal> {
        let secret = label.rsplit('-').next().unwrap_or_default();
        let grant = {
            let t = self.lock();
            t.by_secret
                .get(secret)
                .and_then(|id| t.by_id.get(id))
                .cloned()
        }
        .ok_or(Refusal::Forged)?;
        // The secret was found, so it is this grant's: only its port and sandbox are left to
        // match (no second MAC on every request).
        let prefix = label_prefix(&grant);
        if label.len() != prefix.len() + secret.len() || !label.starts_with(&prefix) {
            return Err(Refusal::Mismatch);
        }
        Self::live(grant)
    }

    /// The grant a token stands for, if its signature holds and the grant is live.
    pub fn check_token(&self, token: &str) -> Result<Grant, Refusal> {
        let (aud, rest) = Audience::from_token(token).ok_or(Refusal::Forged)?;
        let (body, sig) = rest.split_once('.').ok_or(Refusal::Forged)?;
        let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| Refusal::Forged)?;
        let mut mac = HmacSha256::new_from_slice(&self.key).map_err(|_| Refusal::Forged)?;
        mac.update(b"token\0");
        mac.update(body.as_bytes());
        // Constant-time comparison.
        mac.verify_slice(&sig).map_err(|_| Refusal::Forged)?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(body)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(Refusal::Forged)?;
        let grant = self.get(&claims.gid).ok_or(Refusal::Forged)?;
        let expected = Claims {
            gid: grant.id.clone(),
            aud: grant.audience,
            sbx: grant.sandbox_id.clone(),
            port: grant.port,
            exp: grant.expires_at_ms,
        };
        if claims != expected || claims.aud != aud {
            return Err(Refusal::Forged);
        }
        Self::live(grant)
    }

    fn live(grant: Grant) -> Result<Grant, Refusal> {
        if grant.revoked_at_ms.is_some() {
            return Err(Refusal::Revoked);
        }
        if grant.expires_at_ms.is_some_and(|e| e <= now_ms()) {
            return Err(Refusal::Expired);
        }
        Ok(grant)
    }
}

/// `<port>-<sandbox suffix>-`: the part of a host label before the secret.
fn label_prefix(grant: &Grant) -> String {
    let slug = grant
        .sandbox_id
        .strip_prefix("sbx_")
        .unwrap_or(&grant.sandbox_id);
    format!("{}-{slug}-", grant.port)
}

fn new_id(prefix: &str) -> String {
    let bytes: [u8; 10] = rand::random();
    format!("{prefix}_{}", crate::host::hex(&bytes))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tokens_and_host_labels_check_out_and_refuse_any_change() {
        let dir = tempfile::tempdir().unwrap();
        let grants = Grants::open(dir.path()).unwrap();
        let mut g = Grant::new(Audience::PreviewToken, "sbx_abc", 3000, Scope::Read);
        g.expires_at_ms = Some(now_ms() + 60_000);
        let g = grants.insert(g).unwrap();
        let token = grants.token(&g);
        assert!(token.starts_with("mp_"));
        assert_eq!(grants.check_token(&token).unwrap().id, g.id);
        let label = grants.host_label(&g);
        assert!(label.len() <= 63, "{label}");
        assert_eq!(grants.check_host_label(&label).unwrap().id, g.id);

        // Every single-byte change of the token is refused.
        for i in 3..token.len() {
            let mut bytes = token.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let changed = String::from_utf8(bytes).unwrap();
            if changed != token {
                assert!(grants.check_token(&changed).is_err(), "byte {i} accepted");
            }
        }
        // Another port or sandbox in the label, with the same secret.
        let other = label.replacen("3000-", "3001-", 1);
        assert_eq!(
            grants.check_host_label(&other).err(),
            Some(Refusal::Mismatch)
        );

        // A grant outlives a restart, and so does its revocation.
        drop(grants);
        let grants = Grants::open(dir.path()).unwrap();
        assert!(grants.check_token(&token).is_ok());
        grants.revoke(|x| x.id == g.id).unwrap();
        drop(grants);
        let grants = Grants::open(dir.path()).unwrap();
        assert_eq!(grants.check_token(&token).err(), Some(Refusal::Revoked));
        assert_eq!(
            grants.check_host_label(&label).err(),
            Some(Refusal::Revoked)
        );
    }

    #[test]
    fn an_expired_grant_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let grants = Grants::open(dir.path()).unwrap();
        let mut g = Grant::new(Audience::SandboxShare, "sbx_abc", 3000, Scope::Read);
        g.expires_at_ms = Some(now_ms() - 1);
        let g = grants.insert(g).unwrap();
        assert_eq!(
            grants.check_token(&grants.token(&g)).err(),
            Some(Refusal::Expired)
        );
    }

    #[test]
    fn another_sandboxd_key_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let ga = Grants::open(a.path()).unwrap();
        let gb = Grants::open(b.path()).unwrap();
        let g = ga
            .insert(Grant::new(Audience::Preview, "sbx_abc", 3000, Scope::Read))
            .unwrap();
        gb.insert(g.clone()).unwrap();
        assert_eq!(gb.check_token(&ga.token(&g)).err(), Some(Refusal::Forged));
    }
}
