//! Logging in to OpenStack Swift: a token and the storage URL from the auth service, so a
//! swift box needs only an auth URL, a user and a password (opendal's swift service takes
//! a ready token).
//!
//! - **v1** (tempauth, swauth and the providers that keep them): `GET auth_url` with
//!   `X-Auth-User`/`X-Auth-Key`; the answer's `X-Auth-Token` and `X-Storage-Url`.
//! - **Keystone v3** (an `auth_url` ending in `/v3`): `POST auth_url/auth/tokens` with the
//!   password method scoped to a project; the token is `X-Subject-Token` and the storage URL
//!   the `object-store` endpoint of the catalog (public interface, `region` if given).
//!
//! The token is asked for when the box is opened, and again when the server refuses it
//! (it ran out: Keystone's last an hour by default).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// The options of the swift service that are Brickbox's own, used to log in (never passed
/// to opendal).
pub const LOGIN_KEYS: &[&str] = &[
    "auth_url",
    "user",
    "password",
    "project_name",
    "project_id",
    "user_domain_name",
    "project_domain_name",
    "region",
];

/// How to log in to a Swift box: the login options and where they are shown in errors.
#[derive(Clone)]
pub struct Login {
    options: BTreeMap<String, String>,
    timeout: Duration,
    shown: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login").field("auth_url", &self.options.get("auth_url")).finish_non_exhaustive()
    }
}

/// Logs in where `config` has an `auth_url` and no `token`, then sets `token` (and
/// `endpoint`, unless given) and removes the login options. `shown` names the box in
/// errors. Returns the login, to renew the token when it runs out.
pub fn login_if_asked(config: &mut BTreeMap<String, String>, timeout: Duration, shown: &str) -> Result<Option<Login>> {
    let options: BTreeMap<String, String> =
        LOGIN_KEYS.iter().filter_map(|k| config.remove(*k).map(|v| (k.to_string(), v))).collect();
    if !options.contains_key("auth_url") || config.contains_key("token") {
        return Ok(None);
    }
    let login = Login { options, timeout, shown: shown.to_string() };
    let (token, storage_url) = login.token()?;
    config.insert("token".into(), token);
    config.entry("endpoint".into()).or_insert(storage_url);
    Ok(Some(login))
}

impl Login {
    /// A new token and the storage URL.
    pub fn token(&self) -> Result<(String, String)> {
        let auth_url = self.options.get("auth_url").map(String::as_str).unwrap_or_default();
        let shown = &self.shown;
        let get = |k: &str| self.options.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let (Some(user), Some(password)) = (get("user"), get("password")) else {
            return Err(Error::Invalid(format!(
                "{shown}: logging in at {auth_url} needs a user and a password (--option user=… and \
                 BRICKBOX_OPT_PASSWORD, OS_USERNAME/OS_PASSWORD or ST_USER/ST_KEY)"
            )));
        };
        let fail = |why: String| Error::Invalid(format!("{shown}: Swift login at {auth_url} failed: {why}"));
        let client = crate::tls::client_builder()
            .connect_timeout(Duration::from_secs(15))
            .timeout(self.timeout)
            .user_agent(concat!("brickbox/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| fail(e.to_string()))?;
        if !is_keystone_v3(auth_url) {
            return rt.block_on(v1(&client, auth_url, user, password)).map_err(fail);
        }
        let scope = match (get("project_id"), get("project_name")) {
            (Some(id), _) => json!({ "project": { "id": id } }),
            (None, Some(name)) => json!({ "project": {
                "name": name,
                "domain": { "name": get("project_domain_name").or(get("user_domain_name")).unwrap_or("Default") },
            } }),
            (None, None) => {
                return Err(fail(
                    "Keystone needs a project: --option project_name=… (or project_id; OS_PROJECT_NAME)".into(),
                ))
            }
        };
        let body = json!({ "auth": {
            "identity": { "methods": ["password"], "password": { "user": {
                "name": user,
                "domain": { "name": get("user_domain_name").unwrap_or("Default") },
                "password": password,
            } } },
            "scope": scope,
        } });
        rt.block_on(keystone_v3(&client, auth_url, body, get("region"))).map_err(fail)
    }
}

fn is_keystone_v3(auth_url: &str) -> bool {
    auth_url.trim_end_matches('/').ends_with("/v3")
}

fn status_hint(status: reqwest::StatusCode) -> String {
    match status.as_u16() {
        401 | 403 => format!("{status}: the user or password was refused"),
        404 => format!("{status}: no auth service at that URL"),
        _ => status.to_string(),
    }
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// v1: `GET auth_url` with `X-Auth-User` and `X-Auth-Key`.
async fn v1(
    client: &reqwest::Client,
    auth_url: &str,
    user: &str,
    key: &str,
) -> std::result::Result<(String, String), String> {
    let resp = client
        .get(auth_url)
        .header("X-Auth-User", user)
        .header("X-Auth-Key", key)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(status_hint(resp.status()));
    }
    let token = header(&resp, "x-auth-token").or_else(|| header(&resp, "x-storage-token"));
    match (token, header(&resp, "x-storage-url")) {
        (Some(t), Some(u)) => Ok((t, u)),
        _ => Err("the answer has no X-Auth-Token or X-Storage-Url".into()),
    }
}

/// Keystone v3: `POST auth_url/auth/tokens`; the storage URL from the catalog.
async fn keystone_v3(
    client: &reqwest::Client,
    auth_url: &str,
    body: Value,
    region: Option<&str>,
) -> std::result::Result<(String, String), String> {
    let url = format!("{}/auth/tokens", auth_url.trim_end_matches('/'));
    let resp = client
        .post(&url)
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(status_hint(resp.status()));
    }
    let token = header(&resp, "x-subject-token").ok_or("the answer has no X-Subject-Token")?;
    let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
    let doc: Value = serde_json::from_slice(&bytes).map_err(|e| format!("unreadable answer: {e}"))?;
    let url = storage_url_from_catalog(&doc, region)?;
    Ok((token, url))
}

/// The public `object-store` endpoint of a Keystone v3 token's catalog (in `region` if
/// given).
fn storage_url_from_catalog(doc: &Value, region: Option<&str>) -> std::result::Result<String, String> {
    let services = doc["token"]["catalog"].as_array().ok_or("the token has no service catalog")?;
    let endpoints = services
        .iter()
        .filter(|s| s["type"] == "object-store")
        .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
        .filter(|e| e["interface"] == "public");
    let mut regions = Vec::new();
    for e in endpoints {
        let r = e["region"].as_str().or(e["region_id"].as_str()).unwrap_or_default();
        if region.is_none_or(|want| want == r) {
            if let Some(url) = e["url"].as_str() {
                return Ok(url.to_string());
            }
        }
        regions.push(r.to_string());
    }
    Err(match region {
        Some(want) if !regions.is_empty() => {
            format!("the catalog has no object-store in region {want} (it has: {})", regions.join(", "))
        }
        _ => "the catalog has no public object-store endpoint".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_url_comes_from_the_catalog() {
        let doc = json!({ "token": { "catalog": [
            { "type": "identity", "endpoints": [{ "interface": "public", "region": "r1", "url": "https://id" }] },
            { "type": "object-store", "endpoints": [
                { "interface": "internal", "region": "r1", "url": "https://internal/v1/AUTH_p" },
                { "interface": "public", "region": "r1", "url": "https://r1/v1/AUTH_p" },
                { "interface": "public", "region": "r2", "url": "https://r2/v1/AUTH_p" },
            ] },
        ] } });
        assert_eq!(storage_url_from_catalog(&doc, None).unwrap(), "https://r1/v1/AUTH_p");
        assert_eq!(storage_url_from_catalog(&doc, Some("r2")).unwrap(), "https://r2/v1/AUTH_p");
        let e = storage_url_from_catalog(&doc, Some("r9")).unwrap_err();
        assert!(e.contains("r9") && e.contains("r1, r2"), "{e}");
        assert!(storage_url_from_catalog(&json!({}), None).is_err());
        assert!(is_keystone_v3("https://keystone:5000/v3/") && !is_keystone_v3("http://h/auth/v1.0"));
    }

    #[test]
    fn no_login_without_an_auth_url_or_with_a_token() {
        let mut c: BTreeMap<String, String> =
            [("container", "c"), ("token", "t"), ("auth_url", "http://127.0.0.1:1/auth/v1.0"), ("user", "u")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        login_if_asked(&mut c, Duration::from_secs(1), "swift://c").unwrap();
        assert_eq!(c.get("token").map(String::as_str), Some("t"));
        assert!(!c.contains_key("auth_url") && !c.contains_key("user"), "login options are not opendal's");
        c.remove("token");
        c.insert("auth_url".into(), "http://127.0.0.1:1/auth/v1.0".into());
        let e = login_if_asked(&mut c, Duration::from_secs(1), "swift://c").unwrap_err().to_string();
        assert!(e.contains("needs a user and a password"), "{e}");
    }
}
