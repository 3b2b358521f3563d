//! Authentication: the `[auth]` settings, JWT verification and dev-token minting.
//!
//! It owns what a valid token is (signature by the configured HS256 secret or RS256/ES256
//! public key, an unexpired `exp`, a `sub` that is a valid user id, an optional `channels`
//! allow-list) and turns every failure into one typed [`AuthError`]. It must never decide
//! what a user may do on a channel (that is [`crate::rules`]) and never touch sockets.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::SettingsError as ConfigError;

/// Longest user id (`sub`) accepted.
pub const MAX_USER_ID: usize = 128;

/// Whether clients must authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Anonymous mode for development: `connect` is optional, channel rules are not
    /// enforced; a token, when given, still names the user (and must be valid).
    #[default]
    Off,
    /// Every WebSocket client must `connect` with a valid JWT first; rules are enforced.
    Jwt,
}

/// The signature algorithm tokens must use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum TokenAlgorithm {
    /// HMAC-SHA256 with `hs256_secret`.
    #[default]
    #[serde(rename = "HS256")]
    Hs256,
    /// RSA PKCS#1 v1.5 SHA-256 with the RSA public key in `public_key_pem`.
    #[serde(rename = "RS256")]
    Rs256,
    /// ECDSA P-256 SHA-256 with the EC public key in `public_key_pem`.
    #[serde(rename = "ES256")]
    Es256,
}

/// The `[auth]` section.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `off` (default) or `jwt`.
    pub mode: AuthMode,
    /// Token signature algorithm. Default `HS256`.
    pub algorithm: TokenAlgorithm,
    /// The HS256 secret, inline. Also signs dev tokens.
    pub hs256_secret: Option<String>,
    /// A file holding the HS256 secret (trailing newline ignored); relative to the config file.
    pub hs256_secret_file: Option<PathBuf>,
    /// The RS256/ES256 public key, PEM, inline.
    pub public_key_pem: Option<String>,
    /// A file holding the RS256/ES256 public key PEM; relative to the config file.
    pub public_key_file: Option<PathBuf>,
    /// When set, `POST /api/v1/publish` and the HTTP history endpoint need
    /// `Authorization: Bearer <api_key>` (or `X-Api-Key: <api_key>`). The key bypasses
    /// channel rules. In `jwt` mode without it, both endpoints answer 401 `unauthorized`;
    /// only in `off` mode are they open without a key.
    pub api_key: Option<String>,
    /// Lets `POST /api/v1/dev/token` mint tokens signed with `hs256_secret` (never in
    /// production), in either mode. In `off` mode without a configured secret the endpoint
    /// is always on and signs with a random per-process secret. Default false.
    pub dev_tokens: bool,
    /// Clock skew allowed on `exp`. Default 0 s.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// In `jwt` mode, a WebSocket that has not sent a valid `connect` this long after the
    /// upgrade is closed with 4001. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::Off,
            algorithm: TokenAlgorithm::Hs256,
            hs256_secret: None,
            hs256_secret_file: None,
            public_key_pem: None,
            public_key_file: None,
            api_key: None,
            dev_tokens: false,
            leeway: Duration::ZERO,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: format!("auth.{field}"), message: message.into() }
}

impl AuthConfig {
    /// Reads `hs256_secret_file` and `public_key_file` (relative to `base`, the config
    /// file's folder) into the inline fields. Setting both forms of one key is an error.
    pub fn load_files(&mut self, base: &Path) -> Result<(), ConfigError> {
        let read = |field: &str, path: &Path| {
            let path = base.join(path);
            std::fs::read_to_string(&path).map_err(|e| invalid(field, format!("cannot read {}: {e}", path.display())))
        };
        if let Some(path) = self.hs256_secret_file.take() {
            if self.hs256_secret.is_some() {
                return Err(invalid("hs256_secret_file", "set hs256_secret or hs256_secret_file, not both"));
            }
            self.hs256_secret = Some(read("hs256_secret_file", &path)?.trim_end_matches(['\r', '\n']).to_string());
        }
        if let Some(path) = self.public_key_file.take() {
            if self.public_key_pem.is_some() {
                return Err(invalid("public_key_file", "set public_key_pem or public_key_file, not both"));
            }
            self.public_key_pem = Some(read("public_key_file", &path)?);
        }
        Ok(())
    }

    /// Checks that the chosen algorithm has a usable key, naming the field at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for field in ["hs256_secret_file", "public_key_file"] {
            let set = if field == "hs256_secret_file" {
                self.hs256_secret_file.is_some()
            } else {
                self.public_key_file.is_some()
            };
            if set {
                return Err(invalid(
                    field,
                    "key files are read by Config::load; this config was not loaded from a file",
                ));
            }
        }
        if let Some(secret) = &self.hs256_secret {
            if secret.len() < 16 {
                return Err(invalid("hs256_secret", "must be at least 16 bytes"));
            }
        }
        if let Some(key) = &self.api_key {
            if key.len() < 8 || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid("api_key", "must be at least 8 characters without spaces"));
            }
        }
        if self.connect_timeout < Duration::from_millis(100) {
            return Err(invalid("connect_timeout", "must be at least 100ms"));
        }
        match self.algorithm {
            TokenAlgorithm::Hs256 => {
                if self.mode == AuthMode::Jwt && self.hs256_secret.is_none() {
                    return Err(invalid("hs256_secret", "is required when mode = \"jwt\" and algorithm = \"HS256\""));
                }
            }
            TokenAlgorithm::Rs256 | TokenAlgorithm::Es256 => {
                let Some(pem) = &self.public_key_pem else {
                    return Err(invalid(
                        "public_key_pem",
                        "is required (inline or as public_key_file) for RS256 and ES256",
                    ));
                };
                decoding_key(self.algorithm, None, Some(pem)).map_err(|e| invalid("public_key_pem", e.to_string()))?;
            }
        }
        if self.dev_tokens && self.algorithm != TokenAlgorithm::Hs256 {
            return Err(invalid(
                "dev_tokens",
                "needs algorithm = \"HS256\": dev tokens are HS256 and this node verifies only its algorithm",
            ));
        }
        if self.dev_tokens && self.mode == AuthMode::Jwt && self.hs256_secret.is_none() {
            return Err(invalid("dev_tokens", "needs auth.hs256_secret to sign the tokens"));
        }
        Ok(())
    }
}

/// Why a token was refused. Every variant is answered with `unauthorized` and close 4001.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token where one is required.
    #[error("a token is required: connect with {{\"token\": \"<JWT>\"}}")]
    Missing,
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
    /// The signature does not match the configured key (or the algorithm differs).
    #[error("token signature is invalid for the configured key")]
    BadSignature,
    /// Not a JWT, or claims of the wrong shape.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// `sub` is not a valid user id.
    #[error("token `sub` must be 1-128 characters of [A-Za-z0-9_.@-]")]
    BadSubject,
    /// Minting failed (no secret, or the signer failed).
    #[error("cannot mint a token: {0}")]
    Mint(String),
}

/// The claims Switchyard reads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Channels the user may use in namespaces with the `allowlist` rule; an entry ending in
    /// `*` matches every channel starting with the part before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<String>>,
    /// Information about the connection that presence and Centrifugo's publications show
    /// to others (Centrifugo's `info` claim): any JSON, at most [`MAX_INFO_BYTES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
}

/// Largest `info` claim, as JSON text.
pub const MAX_INFO_BYTES: usize = 4096;

/// Who a connection is, once its token was verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub`.
    pub user: Arc<str>,
    /// The token's `channels` allow-list (None: no claim).
    pub channels: Option<Arc<[String]>>,
    /// The token's `exp`, seconds since the Unix epoch.
    pub exp: u64,
    /// The token's `info` claim as JSON text (None: no claim).
    pub info: Option<Arc<str>>,
}

impl Identity {
    /// True when the allow-list names `channel` exactly or by a `prefix*` entry.
    pub fn allows(&self, channel: &str) -> bool {
        self.channels.as_deref().is_some_and(|list| {
            list.iter().any(|entry| match entry.strip_suffix('*') {
                Some(prefix) => channel.starts_with(prefix),
                None => entry == channel,
            })
        })
    }
}

/// True for a valid user id: 1-128 characters of `[A-Za-z0-9_.@-]` (no `:`, so ids can be
/// joined into `user:{id}` and `dialog:{a}:{b}` names).
pub fn is_valid_user_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_USER_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-'))
}

fn algorithm(a: TokenAlgorithm) -> Algorithm {
    match a {
        TokenAlgorithm::Hs256 => Algorithm::HS256,
        TokenAlgorithm::Rs256 => Algorithm::RS256,
        TokenAlgorithm::Es256 => Algorithm::ES256,
    }
}

fn decoding_key(
    alg: TokenAlgorithm,
    secret: Option<&[u8]>,
    pem: Option<&str>,
) -> Result<DecodingKey, jsonwebtoken::errors::Error> {
    match alg {
        TokenAlgorithm::Hs256 => Ok(DecodingKey::from_secret(secret.unwrap_or_default())),
        TokenAlgorithm::Rs256 => DecodingKey::from_rsa_pem(pem.unwrap_or_default().as_bytes()),
        TokenAlgorithm::Es256 => DecodingKey::from_ec_pem(pem.unwrap_or_default().as_bytes()),
    }
}

// === impl Verifier ===

/// Verifies tokens with the configured key. Built once per node; verification is pure CPU.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    /// The HS256 secret dev tokens are signed with: the configured one only with
    /// `dev_tokens = true`, or in `off` mode without a configured secret a random
    /// per-process one (whose tokens no other node accepts). None when dev tokens are not
    /// allowed.
    dev_secret: Option<Vec<u8>>,
}

impl Verifier {
    /// Builds the verifier of a validated `[auth]` section.
    pub fn new(config: &AuthConfig) -> Self {
        // A configured secret is shared with other nodes (possibly in `jwt` mode): tokens
        // signed with it are real credentials, so minting them needs the explicit flag.
        // Dev tokens are HS256: with another algorithm this node would refuse them.
        let dev_allowed = config.algorithm == TokenAlgorithm::Hs256
            && match &config.hs256_secret {
                Some(_) => config.dev_tokens,
                None => config.mode == AuthMode::Off,
            };
        let secret = config.hs256_secret.as_ref().map(|s| s.as_bytes().to_vec()).or_else(|| {
            (config.mode == AuthMode::Off && config.algorithm == TokenAlgorithm::Hs256).then(random_secret)
        });
        let key = decoding_key(config.algorithm, secret.as_deref(), config.public_key_pem.as_deref())
            .expect("auth keys are checked by AuthConfig::validate");
        let mut validation = Validation::new(algorithm(config.algorithm));
        validation.leeway = config.leeway.as_secs();
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_aud = false;
        let dev_secret = if dev_allowed { secret } else { None };
        Self { key, validation, dev_secret }
    }

    /// Checks a token and returns who it names.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => AuthError::BadSignature,
            ErrorKind::MissingRequiredClaim(c) => AuthError::Malformed(format!("claim `{c}` is required")),
            _ => AuthError::Malformed(e.to_string()),
        })?;
        let claims = data.claims;
        if !is_valid_user_id(&claims.sub) {
            return Err(AuthError::BadSubject);
        }
        let info = match claims.info.filter(|v| !v.is_null()) {
            Some(v) => {
                let text = v.to_string();
                if text.len() > MAX_INFO_BYTES {
                    return Err(AuthError::Malformed(format!("claim `info` is over {MAX_INFO_BYTES} bytes")));
                }
                Some(Arc::from(text))
            }
            None => None,
        };
        Ok(Identity { user: claims.sub.into(), channels: claims.channels.map(Arc::from), exp: claims.exp, info })
    }

    /// Mints a dev token (HS256) when dev tokens are allowed (see [`AuthConfig::dev_tokens`]).
    pub fn mint_dev(&self, user: &str, ttl: Duration, channels: Option<Vec<String>>) -> Result<String, AuthError> {
        let secret = self.dev_secret.as_deref().ok_or_else(|| AuthError::Mint("dev tokens are disabled".into()))?;
        mint_hs256(secret, user, ttl, channels)
    }

    /// The clock skew allowed on `exp` (`auth.leeway`).
    pub fn leeway(&self) -> Duration {
        Duration::from_secs(self.validation.leeway)
    }

    /// True when [`Verifier::mint_dev`] can succeed.
    pub fn dev_tokens_enabled(&self) -> bool {
        self.dev_secret.is_some()
    }
}

fn random_secret() -> Vec<u8> {
    use rand::RngCore as _;
    let mut secret = vec![0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    secret
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Signs `{sub, exp = now + ttl, channels?}` with an HS256 secret.
pub fn mint_hs256(
    secret: &[u8],
    user: &str,
    ttl: Duration,
    channels: Option<Vec<String>>,
) -> Result<String, AuthError> {
    if !is_valid_user_id(user) {
        return Err(AuthError::BadSubject);
    }
    let claims = Claims { sub: user.to_string(), exp: now_secs() + ttl.as_secs(), channels, info: None };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret))
        .map_err(|e| AuthError::Mint(e.to_string()))
}

/// `switchyard token`: a token for `user` signed with the config's HS256 secret.
pub fn mint_from_config(
    config: &AuthConfig,
    user: &str,
    ttl: Duration,
    channels: Option<Vec<String>>,
) -> Result<String, AuthError> {
    if config.algorithm != TokenAlgorithm::Hs256 {
        return Err(AuthError::Mint(
            "the config uses a public key; sign RS256/ES256 tokens with your private key".into(),
        ));
    }
    let secret = config.hs256_secret.as_ref().ok_or_else(|| AuthError::Mint("auth.hs256_secret is not set".into()))?;
    mint_hs256(secret.as_bytes(), user, ttl, channels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs_config() -> AuthConfig {
        AuthConfig { mode: AuthMode::Jwt, hs256_secret: Some("0123456789abcdef-secret".into()), ..Default::default() }
    }

    #[test]
    fn round_trip_and_failures() {
        let c = hs_config();
        let v = Verifier::new(&c);
        let t = mint_from_config(&c, "alice", Duration::from_secs(60), Some(vec!["room:*".into()])).unwrap();
        let id = v.verify(&t).unwrap();
        assert_eq!(&*id.user, "alice");
        assert!(id.allows("room:1") && !id.allows("other:1"));
        assert_eq!(v.verify("garbage").unwrap_err(), AuthError::Malformed("InvalidToken".into()));
        let other = mint_hs256(b"another-secret-of-16-bytes", "alice", Duration::from_secs(60), None).unwrap();
        assert_eq!(v.verify(&other).unwrap_err(), AuthError::BadSignature);
        let claims = Claims { sub: "alice".into(), exp: now_secs() - 10, channels: None, info: None };
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(c.hs256_secret.as_ref().unwrap().as_bytes()),
        )
        .unwrap();
        assert_eq!(v.verify(&expired).unwrap_err(), AuthError::Expired);
        assert!(!v.dev_tokens_enabled());
        assert_eq!(mint_hs256(b"0123456789abcdef", "a:b", Duration::from_secs(1), None), Err(AuthError::BadSubject));
    }

    #[test]
    fn off_mode_mints_with_a_process_secret() {
        let v = Verifier::new(&AuthConfig::default());
        let t = v.mint_dev("bob", Duration::from_secs(60), None).unwrap();
        assert_eq!(&*v.verify(&t).unwrap().user, "bob");
    }

    #[test]
    fn off_mode_with_a_configured_secret_mints_only_with_the_flag() {
        // The secret may be shared with jwt nodes: a dev token signed with it would be a
        // real credential there.
        let secret = "0123456789abcdef-secret";
        let off = AuthConfig { hs256_secret: Some(secret.into()), ..Default::default() };
        let v = Verifier::new(&off);
        assert!(!v.dev_tokens_enabled());
        assert!(matches!(v.mint_dev("bob", Duration::from_secs(60), None), Err(AuthError::Mint(_))));
        let on = AuthConfig { dev_tokens: true, ..off.clone() };
        let t = Verifier::new(&on).mint_dev("bob", Duration::from_secs(60), None).unwrap();
        assert_eq!(&*Verifier::new(&hs_config()).verify(&t).unwrap().user, "bob");
        // Without a configured secret, off-mode dev tokens use a per-process secret that a
        // jwt node refuses.
        let t = Verifier::new(&AuthConfig::default()).mint_dev("bob", Duration::from_secs(60), None).unwrap();
        assert_eq!(Verifier::new(&hs_config()).verify(&t).unwrap_err(), AuthError::BadSignature);
    }

    #[test]
    fn validation_names_fields() {
        let c = AuthConfig { mode: AuthMode::Jwt, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("auth.hs256_secret"));
        let c = AuthConfig { algorithm: TokenAlgorithm::Rs256, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("auth.public_key_pem"));
        let c =
            AuthConfig { algorithm: TokenAlgorithm::Es256, public_key_pem: Some("nope".into()), ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("auth.public_key_pem"));
        let c = AuthConfig { hs256_secret: Some("short".into()), ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("auth.hs256_secret"));
        let pem = include_str!("../../../tests/fixtures/jwt/es256-public.pem");
        let es =
            AuthConfig { algorithm: TokenAlgorithm::Es256, public_key_pem: Some(pem.into()), ..Default::default() };
        assert!(es.validate().is_ok(), "{:?}", es.validate());
        // Off mode with a public key: no dev tokens (the node could not verify them).
        assert!(!Verifier::new(&es).dev_tokens_enabled());
        let es_dev =
            AuthConfig { dev_tokens: true, hs256_secret: Some("0123456789abcdef-secret".into()), ..es.clone() };
        assert!(es_dev.validate().unwrap_err().to_string().contains("auth.dev_tokens"));
        assert!(hs_config().validate().is_ok());
    }
}
