//! Repository locations: a plain path or a URL, turned into an opendal service name and
//! the config map that service takes.
//!
//! | URL | service | from the URL |
//! |---|---|---|
//! | `/path`, `relative/path`, `file:///path` | fs | `root` |
//! | `s3://bucket/prefix` | s3 | `bucket`, `root` |
//! | `sftp://user@host:port/abs/path` | sftp | `endpoint`, `user`, `root` (absolute; `/~/dir` is relative to the login directory) |
//! | `webdav://user@host:port/path` (http), `webdavs://…` (https) | webdav | `endpoint`, `username`, `password`, `root` |
//! | `ftp://user@host:port/path`, `ftps://…` | ftp | `endpoint`, `user`, `password`, `root` |
//! | `azblob://container/prefix` | azblob | `container`, `root` |
//! | `gcs://bucket/prefix` | gcs | `bucket`, `root` |
//! | `b2://bucket/prefix` | b2 | `bucket`, `root` |
//! | `swift://container/prefix` | swift | `container`, `root` |
//! | `gdrive://path`, `onedrive://path`, `dropbox://path` | same name | `root` |
//!
//! Every other setting is one of opendal's own config keys for that service, and comes
//! from, the later winning:
//! 1. Brickbox defaults (s3: `disable_config_load=true`, so `~/.aws` is not read unless
//!    asked for with `disable_config_load=false`);
//! 2. for s3, the usual `AWS_*` environment variables (`AWS_ACCESS_KEY_ID`,
//!    `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`/`AWS_DEFAULT_REGION`,
//!    `AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL`); for swift, OpenStack's `OS_AUTH_URL`,
//!    `OS_USERNAME`, `OS_PASSWORD`, `OS_PROJECT_NAME`, `OS_USER_DOMAIN_NAME`, `OS_REGION_NAME`,
//!    `OS_STORAGE_URL`, `OS_AUTH_TOKEN` … and v1's `ST_AUTH`, `ST_USER`, `ST_KEY`;
//! 3. the repository's config file (`file_options`, read by the command line);
//! 4. environment variables `BRICKBOX_OPT_<KEY>` (key upper case, e.g.
//!    `BRICKBOX_OPT_SECRET_ACCESS_KEY`);
//! 5. the URL itself (bucket, host, user, password, path);
//! 6. the URL's query (`s3://b/p?endpoint=…&region=…`);
//! 7. `--option key=value`.
//!
//! In the config file, the environment, the URL's query and `--option`, `<key>_file=PATH`
//! (e.g. `secret_access_key_file`) sets the option `<key>` to the contents of the file PATH
//! (without a trailing newline), so secrets can live in files only their owner reads.
//!
//! Secrets (passwords, keys, tokens) never appear in [`Location::display`], and their
//! values are listed in [`Location::secrets`] so that error messages can be scrubbed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// One URL scheme Brickbox knows.
#[derive(Debug, Clone, Copy)]
pub struct Scheme {
    /// URL schemes that select it (`webdav`, `webdavs`).
    pub url_schemes: &'static [&'static str],
    /// The opendal service.
    pub service: &'static str,
    /// Whether this build includes the service.
    pub enabled: bool,
    /// What to build with when it is not included.
    pub feature: &'static str,
    /// Example repository URL.
    pub example: &'static str,
    /// Main opendal config keys (key, what it is).
    pub options: &'static [(&'static str, &'static str)],
}

impl Scheme {
    /// What it takes to include the service: `build with --features X`, or what the
    /// platform lacks.
    pub fn how_to_enable(&self) -> String {
        if self.feature.contains(' ') {
            format!("needs {}", self.feature)
        } else {
            format!("build with --features {}", self.feature)
        }
    }
}

/// Config keys whose values are secrets: never printed, scrubbed from messages.
pub const SECRET_KEYS: &[&str] = &[
    "password",
    "secret_access_key",
    "session_token",
    "token",
    "access_token",
    "refresh_token",
    "client_secret",
    "account_key",
    "sas_token",
    "credential",
    "application_key",
    "encryption_key",
    "server_side_encryption_customer_key",
    "temp_url_key",
    "secret_key",
    "access_key_secret",
    "security_token",
    "delegation",
];

/// Whether the value of config key `key` is a secret.
pub fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS.contains(&key)
}

const OAUTH_OPTIONS: &[(&str, &str)] = &[
    ("access_token", "OAuth access token (secret)"),
    ("refresh_token", "OAuth refresh token (secret)"),
    ("client_id", "OAuth client id"),
    ("client_secret", "OAuth client secret (secret)"),
];

/// Every scheme Brickbox knows, whether or not this build includes it.
pub fn schemes() -> &'static [Scheme] {
    const CLOUD: bool = cfg!(feature = "cloud");
    static ALL: &[Scheme] = &[
        Scheme {
            url_schemes: &["file"],
            service: "fs",
            enabled: true,
            feature: "",
            example: "/mnt/usb/box or file:///mnt/usb/box",
            options: &[],
        },
        Scheme {
            url_schemes: &["s3"],
            service: "s3",
            enabled: true,
            feature: "",
            example: "s3://bucket/prefix?endpoint=https://s3.example.com&region=eu-west-1",
            options: &[
                ("endpoint", "service URL (default AWS; e.g. http://127.0.0.1:9000)"),
                ("region", "region (default: detected for AWS, us-east-1 with an endpoint)"),
                ("access_key_id", "access key id (or AWS_ACCESS_KEY_ID)"),
                ("secret_access_key", "secret key (secret; or AWS_SECRET_ACCESS_KEY)"),
                ("session_token", "session token (secret; or AWS_SESSION_TOKEN)"),
                ("enable_virtual_host_style", "true: bucket.host addressing"),
                ("default_storage_class", "e.g. STANDARD_IA"),
                ("disable_config_load", "false: also read ~/.aws and the instance profile"),
            ],
        },
        Scheme {
            url_schemes: &["sftp"],
            service: "sftp",
            enabled: cfg!(unix),
            feature: "a unix target",
            example: "sftp://user@host:22/srv/box",
            options: &[
                ("key", "path of the private key (else ssh-agent / ~/.ssh defaults)"),
                ("known_hosts_strategy", "strict (default), add, or accept"),
                ("user", "login name (or user@ in the URL)"),
            ],
        },
        Scheme {
            url_schemes: &["webdav", "webdavs"],
            service: "webdav",
            enabled: true,
            feature: "",
            example: "webdavs://user@host/dav/box (webdav:// is http, webdavs:// https)",
            options: &[
                ("username", "login name (or user@ in the URL)"),
                ("password", "password (secret)"),
                ("token", "bearer token instead of a password (secret)"),
            ],
        },
        Scheme {
            url_schemes: &["ftp", "ftps"],
            service: "ftp",
            enabled: true,
            feature: "",
            example: "ftp://user@host:21/box (ftps:// for FTP over TLS)",
            options: &[("user", "login name (or user@ in the URL)"), ("password", "password (secret)")],
        },
        Scheme {
            url_schemes: &["azblob"],
            service: "azblob",
            enabled: CLOUD,
            feature: "cloud",
            example: "azblob://container/prefix",
            options: &[
                ("account_name", "storage account"),
                ("account_key", "account key (secret)"),
                ("sas_token", "SAS token instead of a key (secret)"),
                ("endpoint", "default https://<account_name>.blob.core.windows.net"),
            ],
        },
        Scheme {
            url_schemes: &["gcs"],
            service: "gcs",
            enabled: CLOUD,
            feature: "cloud",
            example: "gcs://bucket/prefix",
            options: &[
                ("credential_path", "path of a service account JSON file"),
                ("credential", "service account JSON, base64 (secret)"),
                ("token", "OAuth2 token (secret)"),
                ("endpoint", "default https://storage.googleapis.com"),
            ],
        },
        Scheme {
            url_schemes: &["b2"],
            service: "b2",
            enabled: CLOUD,
            feature: "cloud",
            example: "b2://bucket/prefix",
            options: &[
                ("bucket_id", "id of the bucket (required)"),
                ("application_key_id", "key id"),
                ("application_key", "application key (secret)"),
            ],
        },
        Scheme {
            url_schemes: &["swift"],
            service: "swift",
            enabled: CLOUD,
            feature: "cloud",
            example: "swift://container/prefix?auth_url=https://keystone:5000/v3",
            options: &[
                ("auth_url", "log in here: Keystone v3 (…/v3) or v1 (…/auth/v1.0); or give endpoint and token"),
                ("user", "user to log in as"),
                ("password", "password or v1 key (secret)"),
                ("project_name", "Keystone project (or project_id)"),
                ("user_domain_name", "Keystone domain of the user (default Default)"),
                ("region", "Keystone region of the object store"),
                ("endpoint", "storage URL, e.g. https://host/v1/AUTH_account (without auth_url)"),
                ("token", "auth token (secret; without auth_url)"),
            ],
        },
        Scheme {
            url_schemes: &["gdrive"],
            service: "gdrive",
            enabled: CLOUD,
            feature: "cloud",
            example: "gdrive://Backups/box",
            options: OAUTH_OPTIONS,
        },
        Scheme {
            url_schemes: &["onedrive"],
            service: "onedrive",
            enabled: CLOUD,
            feature: "cloud",
            example: "onedrive://Backups/box",
            options: OAUTH_OPTIONS,
        },
        Scheme {
            url_schemes: &["dropbox"],
            service: "dropbox",
            enabled: CLOUD,
            feature: "cloud",
            example: "dropbox://Backups/box",
            options: OAUTH_OPTIONS,
        },
        Scheme {
            url_schemes: &["rclone"],
            service: "rclone",
            enabled: true,
            feature: "",
            example: "rclone://REMOTE:path/box (a remote of rclone's config, or any rclone path; needs rclone)",
            options: &[
                ("rclone_binary", "the rclone program (default: rclone in PATH)"),
                ("rclone_config", "rclone's config file (default: rclone's own)"),
            ],
        },
        // More services, each behind its own feature (see core/Cargo.toml).
        Scheme {
            url_schemes: &["cos"],
            service: "cos",
            enabled: cfg!(feature = "services-cos"),
            feature: "services-cos",
            example: "cos://bucket-appid/prefix?endpoint=https://cos.ap-guangzhou.myqcloud.com",
            options: &[
                ("endpoint", "regional endpoint (required)"),
                ("secret_id", "SecretId"),
                ("secret_key", "SecretKey (secret)"),
            ],
        },
        Scheme {
            url_schemes: &["oss"],
            service: "oss",
            enabled: cfg!(feature = "services-oss"),
            feature: "services-oss",
            example: "oss://bucket/prefix?endpoint=https://oss-cn-hangzhou.aliyuncs.com",
            options: &[
                ("endpoint", "regional endpoint (required)"),
                ("access_key_id", "AccessKey id"),
                ("access_key_secret", "AccessKey secret (secret)"),
            ],
        },
        Scheme {
            url_schemes: &["obs"],
            service: "obs",
            enabled: cfg!(feature = "services-obs"),
            feature: "services-obs",
            example: "obs://bucket/prefix?endpoint=https://obs.cn-north-4.myhuaweicloud.com",
            options: &[
                ("endpoint", "regional endpoint (required)"),
                ("access_key_id", "access key id"),
                ("secret_access_key", "secret key (secret)"),
            ],
        },
        Scheme {
            url_schemes: &["tos"],
            service: "tos",
            enabled: cfg!(feature = "services-tos"),
            feature: "services-tos",
            example: "tos://bucket/prefix?region=cn-beijing",
            options: &[
                ("region", "region (e.g. cn-beijing)"),
                ("endpoint", "default from the region"),
                ("access_key_id", "access key id"),
                ("secret_access_key", "secret key (secret)"),
            ],
        },
        Scheme {
            url_schemes: &["upyun"],
            service: "upyun",
            enabled: cfg!(feature = "services-upyun"),
            feature: "services-upyun",
            example: "upyun://operator@bucket/prefix",
            options: &[
                ("operator", "operator name (or operator@ in the URL)"),
                ("password", "operator password (secret)"),
            ],
        },
        Scheme {
            url_schemes: &["azdls"],
            service: "azdls",
            enabled: cfg!(feature = "services-azdls"),
            feature: "services-azdls",
            example: "azdls://filesystem/prefix?account_name=NAME",
            options: &[
                ("account_name", "storage account"),
                ("account_key", "account key (secret)"),
                ("sas_token", "SAS token instead of a key (secret)"),
                ("endpoint", "default https://<account_name>.dfs.core.windows.net"),
            ],
        },
        Scheme {
            url_schemes: &["azfile"],
            service: "azfile",
            enabled: cfg!(feature = "services-azfile"),
            feature: "services-azfile",
            example: "azfile://share/prefix?account_name=NAME",
            options: &[
                ("account_name", "storage account"),
                ("account_key", "account key (secret)"),
                ("sas_token", "SAS token instead of a key (secret)"),
                ("endpoint", "default https://<account_name>.file.core.windows.net"),
            ],
        },
        Scheme {
            url_schemes: &["webhdfs"],
            service: "webhdfs",
            enabled: cfg!(feature = "services-webhdfs"),
            feature: "services-webhdfs",
            example: "webhdfs://user@namenode:9870/backups/box",
            options: &[("user_name", "HDFS user (or user@ in the URL)"), ("delegation", "delegation token (secret)")],
        },
        Scheme {
            url_schemes: &["koofr"],
            service: "koofr",
            enabled: cfg!(feature = "services-koofr"),
            feature: "services-koofr",
            example: "koofr://me@example.com@app.koofr.net/Backups/box",
            options: &[("email", "account email (or email@ in the URL)"), ("password", "app password (secret)")],
        },
        Scheme {
            url_schemes: &["pcloud"],
            service: "pcloud",
            enabled: cfg!(feature = "services-pcloud"),
            feature: "services-pcloud",
            example: "pcloud://user@api.pcloud.com/Backups/box (eapi.pcloud.com in Europe)",
            options: &[("username", "login name (or user@ in the URL)"), ("password", "password (secret)")],
        },
        Scheme {
            url_schemes: &["seafile"],
            service: "seafile",
            enabled: cfg!(feature = "services-seafile"),
            feature: "services-seafile",
            example: "seafile://user@seafile.example.com/LIBRARY/box",
            options: &[("username", "login name (or user@ in the URL)"), ("password", "password (secret)")],
        },
        Scheme {
            url_schemes: &["yandex-disk"],
            service: "yandex-disk",
            enabled: cfg!(feature = "services-yandex-disk"),
            feature: "services-yandex-disk",
            example: "yandex-disk://Backups/box",
            options: &[("access_token", "OAuth access token (secret)")],
        },
        Scheme {
            url_schemes: &["aliyun-drive"],
            service: "aliyun-drive",
            enabled: cfg!(feature = "services-aliyun-drive"),
            feature: "services-aliyun-drive",
            example: "aliyun-drive://Backups/box",
            options: &[
                ("refresh_token", "OAuth refresh token (secret)"),
                ("client_id", "OAuth client id"),
                ("client_secret", "OAuth client secret (secret)"),
                ("drive_type", "default, backup or resource"),
            ],
        },
    ];
    ALL
}

/// A parsed repository location.
#[derive(Clone)]
pub struct Location {
    /// The opendal service (`fs`, `s3`, …).
    pub service: &'static str,
    /// The service's config, by opendal key.
    pub config: BTreeMap<String, String>,
    /// The location for messages: `scheme://user@host:port/path`, no password, no query.
    pub display: String,
    /// Secret values that must never be printed.
    pub secrets: Vec<String>,
    /// Things the user should know (e.g. a password in the URL).
    pub warnings: Vec<String>,
    /// For a local box: its absolute path.
    pub local_root: Option<PathBuf>,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let config: BTreeMap<&str, &str> =
            self.config.iter().map(|(k, v)| (k.as_str(), if is_secret_key(k) { "***" } else { v.as_str() })).collect();
        f.debug_struct("Location")
            .field("service", &self.service)
            .field("display", &self.display)
            .field("config", &config)
            .finish_non_exhaustive()
    }
}

impl Location {
    /// Replaces every secret value in `text` with `***`.
    pub fn redact(&self, text: &str) -> String {
        redact(text, &self.secrets)
    }
}

/// Replaces every value of `secrets` in `text` with `***` (longest first; values shorter
/// than 3 characters are left alone so messages stay readable).
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut sorted: Vec<&String> = secrets.iter().filter(|s| s.len() >= 3).collect();
    sorted.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = text.to_string();
    for s in sorted {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "***");
        }
        // Also a percent-encoded form, as it may appear inside URLs.
        let enc = percent_encode(s);
        if enc != *s && out.contains(&enc) {
            out = out.replace(&enc, "***");
        }
    }
    out
}

fn percent_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Parses `location` with the options of the repository's config file (`file_options`),
/// `options` (`--option key=value`) and the process environment.
pub fn parse(location: &str, file_options: &[(String, String)], options: &[(String, String)]) -> Result<Location> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    parse_with_env(location, file_options, options, &env)
}

/// Parses `location` like [`parse`], with the environment given as `(name, value)` pairs.
pub fn parse_with_env(
    location: &str,
    file_options: &[(String, String)],
    options: &[(String, String)],
    env: &[(String, String)],
) -> Result<Location> {
    let location = location.trim();
    if location.is_empty() {
        return Err(Error::Invalid("empty repository location".into()));
    }
    for (k, _) in file_options.iter().chain(options) {
        if k.is_empty() || k.contains(char::is_whitespace) {
            return Err(Error::Invalid(format!("invalid option key '{k}': use --option key=value")));
        }
    }
    let Some((scheme, rest)) = location.split_once("://") else {
        return local(PathBuf::from(location), file_options, options);
    };
    let scheme = scheme.to_ascii_lowercase();
    if scheme == "file" {
        // file:///abs/path; also accept file://relative.
        let path = percent_decode(rest);
        return local(PathBuf::from(path), file_options, options);
    }
    let Some(info) = schemes().iter().find(|s| s.url_schemes.contains(&scheme.as_str())) else {
        let known: Vec<&str> = schemes().iter().flat_map(|s| s.url_schemes.iter().copied()).collect();
        return Err(Error::Invalid(format!(
            "unknown repository scheme '{scheme}://' (known: {}; see 'brickbox backends')",
            known.join(", ")
        )));
    };
    if !info.enabled {
        return Err(Error::Invalid(format!(
            "repository scheme '{scheme}://' ({} service) is not included in this build; {} ('brickbox backends' lists what is)",
            info.service,
            info.how_to_enable()
        )));
    }
    let mut b = Parts { service: info.service, ..Parts::default() };

    // 1. Defaults. 2. The service's usual variables (AWS_* for s3, OpenStack's for swift).
    if info.service == "s3" {
        b.set("disable_config_load", "true");
    }
    let usual: &[(&str, &str)] = match info.service {
        "s3" => &[
            ("AWS_ACCESS_KEY_ID", "access_key_id"),
            ("AWS_SECRET_ACCESS_KEY", "secret_access_key"),
            ("AWS_SESSION_TOKEN", "session_token"),
            ("AWS_DEFAULT_REGION", "region"),
            ("AWS_REGION", "region"),
            ("AWS_ENDPOINT_URL", "endpoint"),
            ("AWS_ENDPOINT_URL_S3", "endpoint"),
        ],
        "swift" => &[
            ("ST_AUTH", "auth_url"),
            ("ST_USER", "user"),
            ("ST_KEY", "password"),
            ("OS_AUTH_URL", "auth_url"),
            ("OS_USERNAME", "user"),
            ("OS_PASSWORD", "password"),
            ("OS_TENANT_NAME", "project_name"),
            ("OS_PROJECT_NAME", "project_name"),
            ("OS_TENANT_ID", "project_id"),
            ("OS_PROJECT_ID", "project_id"),
            ("OS_USER_DOMAIN_NAME", "user_domain_name"),
            ("OS_PROJECT_DOMAIN_NAME", "project_domain_name"),
            ("OS_REGION_NAME", "region"),
            ("OS_STORAGE_URL", "endpoint"),
            ("OS_AUTH_TOKEN", "token"),
        ],
        _ => &[],
    };
    for (var, key) in usual {
        if let Some((_, v)) = env.iter().find(|(k, v)| k == var && !v.is_empty()) {
            b.set(key, v);
        }
    }
    // 3. The repository's config file.
    for (k, v) in file_options {
        b.set_given(&k.to_ascii_lowercase(), v, "the repository config file")?;
    }
    // 4. BRICKBOX_OPT_<KEY>.
    for (name, value) in env {
        if let Some(key) = name.strip_prefix("BRICKBOX_OPT_") {
            if !key.is_empty() {
                b.set_given(&key.to_ascii_lowercase(), value, name)?;
            }
        }
    }

    // 5. The URL.
    let (authority, path_and_query) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let path = percent_decode(path);
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, password) = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((u, p)) => (Some(percent_decode(u)), Some(percent_decode(p))),
            None => (Some(percent_decode(u)), None),
        },
        None => (None, None),
    };
    let user = user.filter(|u| !u.is_empty());
    let hostport = percent_decode(hostport);
    if let Some(p) = &password {
        b.secrets.push(p.clone());
        b.warnings.push(format!(
            "the repository URL contains a password: it may end up in shell history and process lists; use BRICKBOX_OPT_{} or --option {}=… instead",
            password_key(info.service).to_ascii_uppercase(),
            password_key(info.service)
        ));
    }
    let trimmed = path.trim_end_matches('/');
    let root = if trimmed.is_empty() { "/".to_string() } else { trimmed.to_string() };
    match info.service {
        svc if name_key(svc).is_some() => {
            let name_key = name_key(svc).unwrap_or("bucket");
            if hostport.is_empty() {
                let what = match name_key {
                    "share_name" => "share",
                    other => other,
                };
                return Err(Error::Invalid(format!("{scheme}:// needs a {what} name: {scheme}://NAME/prefix")));
            }
            b.set(name_key, &hostport);
            b.set("root", &root);
            // Services whose login may sit in the URL: s3 (key id and secret), upyun (operator).
            let url_login = match svc {
                "s3" => Some(("access_key_id", "secret_access_key")),
                "upyun" => Some(("operator", "password")),
                _ => None,
            };
            match url_login {
                Some((ukey, pkey)) => {
                    if let Some(u) = &user {
                        b.set(ukey, u);
                    }
                    if let Some(p) = &password {
                        b.set(pkey, p);
                    }
                }
                None if user.is_some() || password.is_some() => {
                    return Err(Error::Invalid(format!(
                        "{scheme}:// takes no user in the URL; pass credentials with --option or BRICKBOX_OPT_<KEY>"
                    )));
                }
                None => {}
            }
            b.display = format!("{scheme}://{hostport}{}", display_path(&root));
        }
        "sftp" => {
            if hostport.is_empty() {
                return Err(Error::Invalid("sftp:// needs a host: sftp://user@host:port/abs/path".into()));
            }
            if password.is_some() {
                return Err(Error::Invalid(
                    "sftp:// does not take a password: it logs in with an SSH key (--option key=/path/to/key, or ssh-agent)"
                        .into(),
                ));
            }
            let user = user.or_else(|| b.config.get("user").cloned());
            let at = user.as_deref().map(|u| format!("{u}@")).unwrap_or_default();
            b.set("endpoint", &format!("ssh://{at}{hostport}"));
            if let Some(u) = &user {
                b.set("user", u);
            }
            // The path is absolute on the server; `/~/dir` is relative to the login directory.
            let sroot = if root == "/~" {
                String::new()
            } else if let Some(rel) = root.strip_prefix("/~/") {
                rel.to_string()
            } else {
                root.clone()
            };
            if !sroot.is_empty() {
                b.set("root", &sroot);
            }
            b.display = format!("sftp://{at}{hostport}{}", display_path(&root));
        }
        "webdav" | "ftp" | "webhdfs" | "koofr" | "pcloud" | "seafile" => {
            if hostport.is_empty() {
                return Err(Error::Invalid(format!("{scheme}:// needs a host: {scheme}://user@host:port/path")));
            }
            let http = match scheme.as_str() {
                "webdav" | "webhdfs" => "http",
                "webdavs" | "koofr" | "pcloud" | "seafile" => "https",
                other => other,
            };
            b.set("endpoint", &format!("{http}://{hostport}"));
            let (ukey, pkey) = match info.service {
                "webdav" | "pcloud" | "seafile" => ("username", Some("password")),
                "koofr" => ("email", Some("password")),
                "webhdfs" => ("user_name", None),
                _ => ("user", Some("password")),
            };
            if let Some(u) = &user {
                b.set(ukey, u);
            }
            match (pkey, &password) {
                (Some(pkey), Some(p)) => b.set(pkey, p),
                (None, Some(_)) => {
                    return Err(Error::Invalid(format!(
                        "{scheme}:// takes no password in the URL; pass a delegation token with --option or BRICKBOX_OPT_DELEGATION"
                    )));
                }
                _ => {}
            }
            if info.service == "seafile" {
                // The first folder of the path is the library.
                let rest = root.trim_start_matches('/');
                let (library, inside) = rest.split_once('/').unwrap_or((rest, ""));
                if library.is_empty() {
                    return Err(Error::Invalid(format!(
                        "{scheme}:// needs a library: {scheme}://user@host/LIBRARY/path"
                    )));
                }
                b.set("repo_name", library);
                b.set("root", &format!("/{inside}"));
            } else {
                b.set("root", &root);
            }
            let shown_user = user.or_else(|| b.config.get(ukey).cloned());
            let at = shown_user.as_deref().map(|u| format!("{u}@")).unwrap_or_default();
            b.display = format!("{scheme}://{at}{hostport}{}", display_path(&root));
        }
        "rclone" => {
            // Everything up to the query is rclone's: `name:path`, `:backend,params:path`, a
            // local path.
            let remote = percent_decode(rest.split('?').next().unwrap_or_default());
            if remote.is_empty() {
                return Err(Error::Invalid(
                    "rclone:// needs a remote: rclone://REMOTE:path (a remote of 'rclone config', or a path rclone takes)"
                        .into(),
                ));
            }
            let (shown, secrets) = rclone_remote_shown(&remote);
            b.secrets.extend(secrets);
            b.display = format!("rclone://{shown}");
            b.set("remote", &remote);
        }
        "gdrive" | "onedrive" | "dropbox" | "yandex-disk" | "aliyun-drive" => {
            if user.is_some() || password.is_some() {
                return Err(Error::Invalid(format!(
                    "{scheme}:// takes no user in the URL; pass tokens with --option or BRICKBOX_OPT_<KEY>"
                )));
            }
            // Everything after scheme:// is the folder.
            let full = percent_decode(&format!("{hostport}{path}"));
            let folder = format!("/{}", full.trim_matches('/'));
            b.set("root", &folder);
            b.display = format!("{scheme}://{}", folder.trim_start_matches('/'));
        }
        other => return Err(Error::Invalid(format!("service {other} has no URL mapping"))),
    }

    // 6. The URL's query.
    if let Some(q) = query {
        for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
            let k = k.to_ascii_lowercase();
            if is_secret_key(&k) {
                b.warnings.push(format!(
                    "the repository URL contains the secret '{k}': it may end up in shell history and process lists; use BRICKBOX_OPT_{} instead",
                    k.to_ascii_uppercase()
                ));
            }
            b.set_given(&k, &v, "the URL")?;
        }
    }
    // 7. --option.
    for (k, v) in options {
        b.set_given(&k.to_ascii_lowercase(), v, "--option")?;
    }

    let azure_host = match info.service {
        "azblob" => Some("blob"),
        "azdls" => Some("dfs"),
        "azfile" => Some("file"),
        _ => None,
    };
    if let Some(kind) = azure_host.filter(|_| !b.config.contains_key("endpoint")) {
        if let Some(acct) = b.config.get("account_name").cloned() {
            b.set("endpoint", &format!("https://{acct}.{kind}.core.windows.net"));
        }
    }
    if info.service == "s3" {
        if let Some(ep) = b.config.get("endpoint").cloned() {
            // A trailing slash makes opendal build `//bucket` paths.
            b.set("endpoint", ep.trim_end_matches('/'));
        }
    }
    // ssh only says the login was refused when the key it was given cannot be read (it tries
    // the agent's keys and its own instead): said here, naming the file.
    if let (Some(key), "sftp") = (b.config.get("key").cloned(), info.service) {
        let path = match (key.strip_prefix("~/"), std::env::var_os("HOME")) {
            (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
            _ => PathBuf::from(&key),
        };
        if let Err(e) = std::fs::File::open(&path) {
            b.warnings.push(format!(
                "the SSH key {key} cannot be read ({e}); ssh tries the agent's keys and its default ones instead"
            ));
        }
    }
    for (k, v) in &b.config {
        if is_secret_key(k) && !v.is_empty() {
            b.secrets.push(v.clone());
        }
    }
    for k in b.config.keys() {
        if !known_key(info.service, k) {
            b.warnings.push(format!(
                "'{k}' is not a known option of the {} service; passed to it anyway (see 'brickbox backends')",
                info.service
            ));
        }
    }
    let Parts { service, config, display, secrets, warnings } = b;
    Ok(Location { service, config, display, secrets, warnings, local_root: None })
}

/// An rclone remote for messages, and the secrets it holds: the parameters of a connection
/// string (`:s3,access_key_id=…,secret_access_key=…:bucket/box`) are left out of the
/// message, and the values of those named like secrets are scrubbed from every message.
fn rclone_remote_shown(remote: &str) -> (String, Vec<String>) {
    // `name,params:path`, or `:backend,params:path` on the fly.
    let (lead, body) = match remote.strip_prefix(':') {
        Some(rest) => (":", rest),
        None => ("", remote),
    };
    let (name, path) = match split_unquoted(body, ':') {
        Some(split) => split,
        // A connection string with nothing after its parameters (a typo, an unclosed quote):
        // all of it is parameters.
        None if !lead.is_empty() => (body, ""),
        None => return (remote.to_string(), Vec::new()),
    };
    let Some((base, params)) = split_unquoted(name, ',') else {
        return (remote.to_string(), Vec::new());
    };
    // A path with no remote (`/srv/a,b:c`) has a slash in what would be the remote's name;
    // parameters may hold slashes (a secret key, a quoted URL). `:backend,…` always has one.
    if lead.is_empty() && base.contains(['/', '\\']) {
        return (remote.to_string(), Vec::new());
    }
    // A value holding an unquoted `:` (`endpoint=https://…`; rclone wants it quoted) ends the
    // name too early: what looks like the path then still holds parameters, so none of it is
    // shown, and its parameters are looked at for secrets too.
    let params_in_path = path.contains('=');
    let all_params = if params_in_path { &body[base.len() + 1..] } else { params };
    let mut secrets = Vec::new();
    let mut rest = Some(all_params);
    while let Some(part) = rest {
        let (param, more) = split_unquoted(part, ',').map_or((part, None), |(p, m)| (p, Some(m)));
        rest = more;
        // Without quotes, a parameter may run into the path (`key=value:bucket/box`).
        let param = if params_in_path { split_unquoted(param, ':').map_or(param, |(p, _)| p) } else { param };
        let Some((k, v)) = param.split_once('=') else { continue };
        let k = k.trim().to_ascii_lowercase();
        let v = v.trim().trim_matches(['"', '\'']);
        let secret =
            ["pass", "secret", "token"].iter().any(|w| k.contains(w)) || k.ends_with("key") || k.ends_with("pem");
        if secret && !v.is_empty() {
            secrets.push(v.to_string());
        }
    }
    if params_in_path || path.is_empty() {
        return (format!("{lead}{base},…"), secrets);
    }
    (format!("{lead}{base},…:{path}"), secrets)
}

/// `s` split at the first `sep` outside single or double quotes.
fn split_unquoted(s: &str, sep: char) -> Option<(&str, &str)> {
    let mut quote = None;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, c) if c == sep => return Some((&s[..i], &s[i + c.len_utf8()..])),
            _ => {}
        }
    }
    None
}

/// The config key that names the bucket (or container, share…) of services that have one.
fn name_key(service: &str) -> Option<&'static str> {
    match service {
        "s3" | "gcs" | "b2" | "cos" | "oss" | "obs" | "tos" | "upyun" => Some("bucket"),
        "azblob" | "swift" => Some("container"),
        "azdls" => Some("filesystem"),
        "azfile" => Some("share_name"),
        _ => None,
    }
}

fn password_key(service: &str) -> &'static str {
    if service == "s3" {
        "secret_access_key"
    } else {
        "password"
    }
}

fn display_path(root: &str) -> String {
    if root == "/" {
        String::new()
    } else {
        root.to_string()
    }
}

#[derive(Default)]
struct Parts {
    service: &'static str,
    config: BTreeMap<String, String>,
    display: String,
    secrets: Vec<String>,
    warnings: Vec<String>,
}

impl Parts {
    fn set(&mut self, key: &str, value: &str) {
        self.config.insert(key.to_string(), value.to_string());
    }

    /// Sets an option the user gave (in `source`): `<key>_file=PATH` sets `<key>` to the
    /// contents of PATH.
    fn set_given(&mut self, key: &str, value: &str, source: &str) -> Result<()> {
        match secret_file_key(self.service, key) {
            Some(base) => {
                let text = read_option_file(key, value, source)?;
                self.set(base, &text);
            }
            None => self.set(key, value),
        }
        Ok(())
    }
}

/// The contents of a file holding a secret (a password, a key), without the line ending(s)
/// an editor leaves at its end.
pub fn read_secret_file(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    let mut s = std::fs::read(path)?;
    while s.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
        s.pop();
    }
    Ok(s)
}

/// For `<key>_file`, where `<key>` is an option of `service` and `<key>_file` is not: `<key>`.
fn secret_file_key<'k>(service: &str, key: &'k str) -> Option<&'k str> {
    let base = key.strip_suffix("_file")?;
    (known_key(service, base) && !known_key(service, key)).then_some(base)
}

/// The value of option `<key>_file`: the contents of the file it names, without the
/// trailing newline. Errors name the option and the file, never the contents.
fn read_option_file(key: &str, path: &str, source: &str) -> Result<String> {
    let bad = |why: String| Error::Invalid(format!("option {key} (from {source}): {why}"));
    let bytes = read_secret_file(std::path::Path::new(path)).map_err(|e| bad(format!("cannot read {path}: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|_| bad(format!("{path} is not UTF-8 text")))?;
    if text.is_empty() {
        return Err(bad(format!("{path} is empty")));
    }
    Ok(text)
}

fn local(path: PathBuf, file_options: &[(String, String)], options: &[(String, String)]) -> Result<Location> {
    if path.as_os_str().is_empty() {
        return Err(Error::Invalid("empty repository path".into()));
    }
    let abs =
        if path.is_absolute() { path } else { std::env::current_dir().map_err(|e| Error::io(".", e))?.join(path) };
    let root = abs
        .to_str()
        .ok_or_else(|| Error::Invalid(format!("repository path {} is not valid UTF-8", abs.display())))?
        .to_string();
    let mut config = BTreeMap::new();
    config.insert("root".to_string(), root.clone());
    config.insert("atomic_write_dir".to_string(), format!("{}/.tmp", root.trim_end_matches('/')));
    let mut warnings = Vec::new();
    for (k, v) in file_options.iter().chain(options) {
        let k = k.to_ascii_lowercase();
        if !known_key("fs", &k) {
            warnings.push(format!("'{k}' is not a known option of the fs service; passed to it anyway"));
        }
        config.insert(k, v.clone());
    }
    Ok(Location { service: "fs", config, display: root, secrets: Vec::new(), warnings, local_root: Some(abs) })
}

/// Whether `key` is a config key of opendal's `service` (as of opendal 0.59).
pub fn known_key(service: &str, key: &str) -> bool {
    let keys: &[&str] = match service {
        "fs" => &["root", "atomic_write_dir"],
        "s3" => &[
            "root",
            "bucket",
            "enable_versioning",
            "endpoint",
            "region",
            "profile",
            "access_key_id",
            "secret_access_key",
            "session_token",
            "role_arn",
            "external_id",
            "role_session_name",
            "assume_role_duration_seconds",
            "disable_config_load",
            "skip_signature",
            "allow_anonymous",
            "server_side_encryption",
            "server_side_encryption_aws_kms_key_id",
            "server_side_encryption_customer_algorithm",
            "server_side_encryption_customer_key",
            "server_side_encryption_customer_key_md5",
            "default_storage_class",
            "enable_virtual_host_style",
            "batch_max_operations",
            "delete_max_size",
            "disable_stat_with_override",
            "checksum_algorithm",
            "disable_write_with_if_match",
            "enable_write_with_append",
            "enable_request_payer",
            "default_acl",
            "disable_list_objects_v2",
            "disable_ec2_metadata",
        ],
        "sftp" => &["endpoint", "root", "user", "key", "known_hosts_strategy"],
        "webdav" => &[
            "endpoint",
            "username",
            "password",
            "token",
            "root",
            "disable_copy",
            "disable_create_dir",
            "enable_user_metadata",
            "user_metadata_prefix",
            "user_metadata_uri",
            "enable_conditional_read",
        ],
        "ftp" => &["endpoint", "root", "user", "password"],
        "azblob" => &[
            "root",
            "container",
            "endpoint",
            "account_name",
            "account_key",
            "encryption_key",
            "encryption_key_sha256",
            "encryption_algorithm",
            "sas_token",
            "batch_max_operations",
            "skip_signature",
        ],
        "gcs" => &[
            "root",
            "bucket",
            "endpoint",
            "scope",
            "service_account",
            "credential",
            "credential_path",
            "predefined_acl",
            "default_storage_class",
            "skip_signature",
            "allow_anonymous",
            "disable_vm_metadata",
            "disable_config_load",
            "token",
        ],
        "b2" => &["root", "application_key_id", "application_key", "bucket", "bucket_id"],
        "swift" => &["endpoint", "container", "root", "token", "temp_url_key", "temp_url_hash_algorithm"],
        "gdrive" | "dropbox" => &["root", "access_token", "refresh_token", "client_id", "client_secret"],
        "onedrive" => &["root", "access_token", "refresh_token", "client_id", "client_secret", "enable_versioning"],
        "cos" => &[
            "root",
            "endpoint",
            "secret_id",
            "secret_key",
            "security_token",
            "bucket",
            "enable_versioning",
            "disable_config_load",
        ],
        "oss" => &[
            "root",
            "endpoint",
            "presign_endpoint",
            "bucket",
            "addressing_style",
            "presign_addressing_style",
            "enable_versioning",
            "server_side_encryption",
            "server_side_encryption_key_id",
            "skip_signature",
            "allow_anonymous",
            "access_key_id",
            "access_key_secret",
            "security_token",
            "batch_max_operations",
            "delete_max_size",
            "role_arn",
            "role_session_name",
            "oidc_provider_arn",
            "oidc_token_file",
            "sts_endpoint",
            "external_id",
        ],
        "obs" => &["root", "endpoint", "access_key_id", "secret_access_key", "bucket", "enable_versioning"],
        "tos" => &[
            "root",
            "bucket",
            "endpoint",
            "region",
            "access_key_id",
            "secret_access_key",
            "security_token",
            "disable_config_load",
            "skip_signature",
        ],
        "upyun" => &["root", "bucket", "operator", "password"],
        "azdls" => &[
            "root",
            "filesystem",
            "endpoint",
            "account_name",
            "account_key",
            "client_secret",
            "tenant_id",
            "client_id",
            "sas_token",
            "authority_host",
            "enable_hns",
        ],
        "azfile" => &["root", "endpoint", "share_name", "account_name", "account_key", "sas_token"],
        "webhdfs" => &["root", "endpoint", "user_name", "delegation", "disable_list_batch", "atomic_write_dir"],
        "koofr" => &["root", "endpoint", "email", "password"],
        "pcloud" => &["root", "endpoint", "username", "password"],
        "seafile" => &["root", "endpoint", "username", "password", "repo_name"],
        "yandex-disk" => &["root", "access_token"],
        "aliyun-drive" => &["root", "access_token", "client_id", "client_secret", "refresh_token", "drive_type"],
        "rclone" => crate::rclone::OPTIONS,
        _ => &[],
    };
    // The swift login's options are Brickbox's own (see crate::swiftauth).
    keys.contains(&key) || (service == "swift" && crate::swiftauth::LOGIN_KEYS.contains(&key))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let (Some(h), Some(l)) = (
                bytes.get(i + 1).and_then(|c| (*c as char).to_digit(16)),
                bytes.get(i + 2).and_then(|c| (*c as char).to_digit(16)),
            ) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `key=value` (as given to `--option`).
pub fn parse_option(s: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_ascii_lowercase(), v.to_string())),
        _ => Err(Error::Invalid(format!("invalid option '{}': expected key=value", redact_option(s)))),
    }
}

fn redact_option(s: &str) -> String {
    // Never echo what might be a secret value.
    s.split_once('=').map(|(k, _)| format!("{k}=***")).unwrap_or_else(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(loc: &str, opts: &[(&str, &str)], env: &[(&str, &str)]) -> Location {
        let opts: Vec<(String, String)> = opts.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        parse_with_env(loc, &[], &opts, &env).unwrap()
    }

    fn get<'a>(l: &'a Location, k: &str) -> Option<&'a str> {
        l.config.get(k).map(String::as_str)
    }

    #[test]
    fn plain_path_and_file_url_are_fs() {
        let l = p("/srv/box", &[], &[]);
        assert_eq!(l.service, "fs");
        assert_eq!(get(&l, "root"), Some("/srv/box"));
        assert_eq!(l.local_root.as_deref(), Some(std::path::Path::new("/srv/box")));
        let l = p("file:///srv/my%20box", &[], &[]);
        assert_eq!(get(&l, "root"), Some("/srv/my box"));
        let l = p("rel/box", &[], &[]);
        assert!(l.local_root.unwrap().is_absolute());
    }

    #[test]
    fn s3_url_query_env_and_options() {
        let l = p(
            "s3://bkt/some/prefix/?endpoint=http://127.0.0.1:5000/&region=eu-1",
            &[("secret_access_key", "opt-secret")],
            &[
                ("AWS_ACCESS_KEY_ID", "AKIDENV"),
                ("AWS_SECRET_ACCESS_KEY", "env-secret"),
                ("AWS_REGION", "us-west-2"),
                ("BRICKBOX_OPT_SESSION_TOKEN", "tok-123"),
            ],
        );
        assert_eq!(l.service, "s3");
        assert_eq!(get(&l, "bucket"), Some("bkt"));
        assert_eq!(get(&l, "root"), Some("/some/prefix"));
        assert_eq!(get(&l, "endpoint"), Some("http://127.0.0.1:5000"));
        assert_eq!(get(&l, "region"), Some("eu-1"), "query beats AWS_REGION");
        assert_eq!(get(&l, "access_key_id"), Some("AKIDENV"));
        assert_eq!(get(&l, "secret_access_key"), Some("opt-secret"), "--option beats env");
        assert_eq!(get(&l, "session_token"), Some("tok-123"));
        assert_eq!(get(&l, "disable_config_load"), Some("true"));
        assert_eq!(l.display, "s3://bkt/some/prefix");
        assert!(l.secrets.contains(&"opt-secret".to_string()));
        assert!(l.secrets.contains(&"tok-123".to_string()));
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        let dbg = format!("{l:?}");
        assert!(!dbg.contains("opt-secret") && !dbg.contains("tok-123"), "{dbg}");
    }

    #[test]
    fn s3_user_may_enable_config_load() {
        let l = p("s3://bkt", &[("disable_config_load", "false")], &[]);
        assert_eq!(get(&l, "disable_config_load"), Some("false"));
        assert_eq!(get(&l, "root"), Some("/"));
    }

    #[test]
    fn sftp_url() {
        let l = p("sftp://alice@example.org:2222/srv/box", &[("key", "/k/id")], &[]);
        assert_eq!(l.service, "sftp");
        assert_eq!(get(&l, "endpoint"), Some("ssh://alice@example.org:2222"));
        assert_eq!(get(&l, "user"), Some("alice"));
        assert_eq!(get(&l, "root"), Some("/srv/box"));
        assert_eq!(get(&l, "key"), Some("/k/id"));
        assert_eq!(l.display, "sftp://alice@example.org:2222/srv/box");
        let l = p("sftp://host/~/box", &[], &[]);
        assert_eq!(get(&l, "root"), Some("box"));
        assert!(parse_with_env("sftp://a:pw@host/x", &[], &[], &[]).is_err());
    }

    #[test]
    fn webdav_and_ftp_urls_hide_passwords() {
        let l = p("webdav://bob:hunter2x@dav.local:8080/dav/box", &[], &[]);
        assert_eq!(l.service, "webdav");
        assert_eq!(get(&l, "endpoint"), Some("http://dav.local:8080"));
        assert_eq!(get(&l, "username"), Some("bob"));
        assert_eq!(get(&l, "password"), Some("hunter2x"));
        assert_eq!(get(&l, "root"), Some("/dav/box"));
        assert_eq!(l.display, "webdav://bob@dav.local:8080/dav/box");
        assert_eq!(l.warnings.len(), 1);
        assert!(!l.warnings[0].contains("hunter2x"));
        assert_eq!(l.redact("auth hunter2x failed"), "auth *** failed");
        let l = p("webdavs://dav.local/x", &[], &[("BRICKBOX_OPT_PASSWORD", "envpw")]);
        assert_eq!(get(&l, "endpoint"), Some("https://dav.local"));
        assert_eq!(get(&l, "password"), Some("envpw"));
        assert!(l.warnings.is_empty());
        let l = p("ftp://u%40x:p%3Aw@127.0.0.1:2121/b", &[], &[]);
        assert_eq!(get(&l, "endpoint"), Some("ftp://127.0.0.1:2121"));
        assert_eq!(get(&l, "user"), Some("u@x"));
        assert_eq!(get(&l, "password"), Some("p:w"));
        assert_eq!(l.display, "ftp://u@x@127.0.0.1:2121/b");
    }

    #[test]
    fn unknown_and_disabled_schemes() {
        let e = parse_with_env("nope://x", &[], &[], &[]).unwrap_err().to_string();
        assert!(e.contains("unknown repository scheme"), "{e}");
        if !cfg!(feature = "cloud") {
            let e = parse_with_env("gcs://b/p", &[], &[], &[]).unwrap_err().to_string();
            assert!(e.contains("--features cloud"), "{e}");
        }
        if !cfg!(feature = "services-seafile") {
            let e = parse_with_env("seafile://u@h/lib/box", &[], &[], &[]).unwrap_err().to_string();
            assert!(e.contains("not included in this build; build with --features services-seafile"), "{e}");
        }
    }

    #[test]
    fn rclone_remotes() {
        let l = p("rclone://gdrive:Backups/box", &[("rclone_config", "/etc/rclone.conf")], &[]);
        assert_eq!((l.service, get(&l, "remote")), ("rclone", Some("gdrive:Backups/box")));
        assert_eq!(l.display, "rclone://gdrive:Backups/box");
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        // A local path, a Windows-like path: given to rclone as they are.
        assert_eq!(get(&p("rclone:///srv/box", &[], &[]), "remote"), Some("/srv/box"));
        assert_eq!(p("rclone://C:\\box", &[], &[]).display, "rclone://C:\\box");
        // Connection strings: parameters left out of messages, secret ones scrubbed.
        let l = p("rclone://:s3,provider=Minio,access_key_id=AK1,secret_access_key=SK123:bucket/box", &[], &[]);
        assert_eq!(l.display, "rclone://:s3,…:bucket/box");
        assert_eq!(l.secrets, vec!["SK123".to_string()]);
        assert_eq!(get(&l, "remote"), Some(":s3,provider=Minio,access_key_id=AK1,secret_access_key=SK123:bucket/box"));
        // A value with an unquoted `:` (rclone refuses it): nothing after the backend shown.
        let l = p("rclone://:s3,endpoint=https://h:9000,secret_access_key=SK9:bucket/box", &[], &[]);
        assert_eq!(l.display, "rclone://:s3,…");
        assert_eq!(l.secrets, vec!["SK9".to_string()]);
        let l = p("rclone://nas,pass='pw%3Aa':box?rclone_binary=/opt/rclone", &[], &[]);
        assert_eq!((l.display.as_str(), get(&l, "rclone_binary")), ("rclone://nas,…:box", Some("/opt/rclone")));
        assert_eq!(l.secrets, vec!["pw:a".to_string()]);
        // A quoted value holding `:` and `/` (a URL) is a parameter like any other.
        let l = p("rclone://:webdav,url='http://127.0.0.1:41002',user=u,pass=OBSC9ured:/rcbox", &[], &[]);
        assert_eq!(l.display, "rclone://:webdav,…:/rcbox");
        assert_eq!(l.secrets, vec!["OBSC9ured".to_string()]);
        // A secret with a slash, as S3 secret keys often have.
        let l = p("rclone://:s3,access_key_id=AK,secret_access_key=wJal/K7MD:bucket/box", &[], &[]);
        assert_eq!(
            (l.display.as_str(), l.secrets.clone()),
            ("rclone://:s3,…:bucket/box", vec!["wJal/K7MD".to_string()])
        );
        assert_eq!(p("rclone:///srv/a,b:c", &[], &[]).display, "rclone:///srv/a,b:c");
        // No path after the parameters, or a quote left open: still no secret shown.
        for typo in [":s3,access_key_id=AK,secret_access_key=SKtypo", ":s3,secret_access_key='SKtypo"] {
            let l = p(&format!("rclone://{typo}"), &[], &[]);
            assert_eq!(
                (l.display.as_str(), l.secrets.clone()),
                ("rclone://:s3,…", vec!["SKtypo".to_string()]),
                "{typo}"
            );
        }
        let e = parse_with_env("rclone://", &[], &[], &[]).unwrap_err().to_string();
        assert!(e.contains("needs a remote"), "{e}");
    }

    /// The services behind their own features: URLs map to the config keys their opendal
    /// service reads.
    #[cfg(feature = "more-services")]
    #[test]
    fn more_services_urls() {
        let l = p("cos://bk-125/a/b?endpoint=https://cos.example.com", &[("secret_key", "cos-sk")], &[]);
        assert_eq!((get(&l, "bucket"), get(&l, "root")), (Some("bk-125"), Some("/a/b")));
        assert!(l.secrets.contains(&"cos-sk".to_string()));
        let l = p("oss://bk/p", &[("access_key_secret", "oss-sk")], &[]);
        assert_eq!(get(&l, "bucket"), Some("bk"));
        assert!(l.secrets.contains(&"oss-sk".to_string()) && l.warnings.is_empty(), "{:?}", l.warnings);
        let l = p("upyun://op:pw9@bk/p", &[], &[]);
        assert_eq!(
            (get(&l, "operator"), get(&l, "password"), get(&l, "bucket")),
            (Some("op"), Some("pw9"), Some("bk"))
        );
        assert_eq!(l.display, "upyun://bk/p");
        let l = p("azdls://fs1/p", &[("account_name", "acct")], &[]);
        assert_eq!(
            (get(&l, "filesystem"), get(&l, "endpoint")),
            (Some("fs1"), Some("https://acct.dfs.core.windows.net"))
        );
        let l = p("azfile://share1/p", &[("account_name", "acct")], &[]);
        assert_eq!(
            (get(&l, "share_name"), get(&l, "endpoint")),
            (Some("share1"), Some("https://acct.file.core.windows.net"))
        );
        let e = parse_with_env("azfile:///p", &[], &[], &[]).unwrap_err().to_string();
        assert!(e.contains("needs a share name"), "{e}");
        let l = p("webhdfs://hdfs@nn:9870/backups/box", &[], &[]);
        assert_eq!(
            (get(&l, "endpoint"), get(&l, "user_name"), get(&l, "root")),
            (Some("http://nn:9870"), Some("hdfs"), Some("/backups/box"))
        );
        let e = parse_with_env("webhdfs://u:pw@nn/b", &[], &[], &[]).unwrap_err().to_string();
        assert!(e.contains("no password") && !e.contains("pw@"), "{e}");
        let l = p("koofr://me@example.com@app.koofr.net/Backups/box", &[("password", "kpw")], &[]);
        assert_eq!(
            (get(&l, "endpoint"), get(&l, "email"), get(&l, "root")),
            (Some("https://app.koofr.net"), Some("me@example.com"), Some("/Backups/box"))
        );
        let l = p("pcloud://u@eapi.pcloud.com/B", &[], &[]);
        assert_eq!((get(&l, "endpoint"), get(&l, "username")), (Some("https://eapi.pcloud.com"), Some("u")));
        let l = p("seafile://u@sf.example.com/My%20Library/backups/box", &[], &[]);
        assert_eq!(
            (get(&l, "repo_name"), get(&l, "root"), l.display.as_str()),
            (Some("My Library"), Some("/backups/box"), "seafile://u@sf.example.com/My Library/backups/box")
        );
        let e = parse_with_env("seafile://u@h/", &[], &[], &[]).unwrap_err().to_string();
        assert!(e.contains("needs a library"), "{e}");
        let l = p("yandex-disk://Backups/box", &[("access_token", "ytok")], &[]);
        assert_eq!(get(&l, "root"), Some("/Backups/box"));
        assert!(l.secrets.contains(&"ytok".to_string()));
        let l = p("aliyun-drive://B/box", &[("drive_type", "backup")], &[]);
        assert_eq!(get(&l, "root"), Some("/B/box"));
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    }

    #[test]
    fn unknown_option_warns() {
        let l = p("s3://b/p", &[("endpiont", "x")], &[]);
        assert!(l.warnings.iter().any(|w| w.contains("endpiont")));
    }

    #[test]
    fn redaction() {
        let s = vec!["s3cr3t/+=".to_string(), "ab".to_string()];
        assert_eq!(redact("x s3cr3t/+= y", &s), "x *** y");
        assert_eq!(redact("x s3cr3t%2F%2B%3D y", &s), "x *** y");
        assert_eq!(redact("ab stays", &s), "ab stays");
        assert!(parse_option("password").is_err());
        let e = parse_option("=topsecret").unwrap_err().to_string();
        assert!(!e.contains("topsecret"), "{e}");
        assert_eq!(parse_option("Region=eu").unwrap(), ("region".into(), "eu".into()));
    }

    fn pairs(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn config_file_options_sit_below_env_and_command_line() {
        let file = pairs(&[("region", "from-file"), ("endpoint", "http://file"), ("access_key_id", "file-id")]);
        let env = pairs(&[("BRICKBOX_OPT_ENDPOINT", "http://env"), ("BRICKBOX_OPT_ACCESS_KEY_ID", "env-id")]);
        let l = parse_with_env("s3://b/p", &file, &pairs(&[("access_key_id", "cli-id")]), &env).unwrap();
        assert_eq!(get(&l, "region"), Some("from-file"));
        assert_eq!(get(&l, "endpoint"), Some("http://env"));
        assert_eq!(get(&l, "access_key_id"), Some("cli-id"));
        // The local service takes them too.
        let l = parse_with_env("/srv/box", &pairs(&[("atomic_write_dir", "/srv/tmp")]), &[], &[]).unwrap();
        assert_eq!(get(&l, "atomic_write_dir"), Some("/srv/tmp"));
    }

    #[test]
    fn secrets_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("s3-secret");
        std::fs::write(&key, "k3y-from-file\n").unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t0ken-from-file").unwrap();
        let key_path = key.to_str().unwrap();
        for (file, env, cli) in [
            (pairs(&[("secret_access_key_file", key_path)]), vec![], vec![]),
            (vec![], pairs(&[("BRICKBOX_OPT_SECRET_ACCESS_KEY_FILE", key_path)]), vec![]),
            (vec![], vec![], pairs(&[("secret_access_key_file", key_path)])),
        ] {
            let l = parse_with_env("s3://b/p", &file, &cli, &env).unwrap();
            assert_eq!(get(&l, "secret_access_key"), Some("k3y-from-file"));
            assert!(!l.config.contains_key("secret_access_key_file"));
            assert!(l.secrets.contains(&"k3y-from-file".to_string()));
            assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        }
        // In the URL's query too; a later source still wins.
        let url = format!("webdav://u@h/dav?token_file={}", token.display());
        let l = parse_with_env(&url, &[], &[], &[]).unwrap();
        assert_eq!(get(&l, "token"), Some("t0ken-from-file"));
        assert!(l.secrets.contains(&"t0ken-from-file".to_string()));
        let l = parse_with_env(&url, &[], &pairs(&[("token", "cli-token")]), &[]).unwrap();
        assert_eq!(get(&l, "token"), Some("cli-token"));
        // Not for keys of other services, nor where `<key>_file` is itself an option.
        let l = parse_with_env("s3://b/p", &[], &pairs(&[("password_file", "/x")]), &[]).unwrap();
        assert_eq!(get(&l, "password_file"), Some("/x"));
        assert!(l.warnings.iter().any(|w| w.contains("password_file")));
    }

    #[test]
    fn unreadable_secret_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let cli = pairs(&[("password_file", missing.to_str().unwrap())]);
        let e = parse_with_env("webdav://u@h/x", &[], &cli, &[]).unwrap_err().to_string();
        assert!(e.contains("password_file") && e.contains("--option") && e.contains("nope"), "{e}");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let env = pairs(&[("BRICKBOX_OPT_PASSWORD_FILE", empty.to_str().unwrap())]);
        let e = parse_with_env("ftp://u@h/x", &[], &[], &env).unwrap_err().to_string();
        assert!(e.contains("is empty") && e.contains("BRICKBOX_OPT_PASSWORD_FILE"), "{e}");
    }
}
