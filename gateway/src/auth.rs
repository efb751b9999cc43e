//! Authentication: JWT verification at the handshake, the claims a session carries, the access
//! rules of PROTOCOL.md §3 `join`, and token minting for the `token` subcommand.

use std::collections::HashSet;
use std::path::Path;

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use storage::{Room, RoomKind};

/// What a token's holder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Agent,
    User,
    Customer,
    Service,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Agent => "agent",
            Role::User => "user",
            Role::Customer => "customer",
            Role::Service => "service",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        Some(match text {
            "admin" => Role::Admin,
            "agent" => Role::Agent,
            "user" => Role::User,
            "customer" => Role::Customer,
            "service" => Role::Service,
            _ => return None,
        })
    }

    /// How this role's messages are labelled (`sender_type`).
    pub fn sender_type(self) -> storage::SenderType {
        match self {
            Role::Admin | Role::Agent => storage::SenderType::Agent,
            Role::User => storage::SenderType::User,
            Role::Customer => storage::SenderType::Customer,
            Role::Service => storage::SenderType::System,
        }
    }

    /// Whether this role writes and sees internal notes: agents and admins only, never a
    /// customer or contact, nor an integration service (notes never leave the team) or a
    /// plain team-room user.
    pub fn sees_notes(self) -> bool {
        matches!(self, Role::Admin | Role::Agent)
    }
}

/// The verified claims of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub tenant: String,
    pub role: Role,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

/// The `aud` claim: RFC 7519 §4.1.3 allows one string or an array of them. The verifier accepts
/// a token when any entry is a configured audience.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl From<String> for Audience {
    fn from(audience: String) -> Audience {
        Audience::One(audience)
    }
}

impl From<&str> for Audience {
    fn from(audience: &str) -> Audience {
        Audience::One(audience.to_owned())
    }
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("invalid token: empty sub or tenant, or one with a control character")]
    EmptyIdentity,
    #[error("bad key configuration: {0}")]
    Config(String),
}

/// Verifies tokens with one configured key and algorithm; `alg: none` and any other algorithm
/// (including the classic RS256→HS256 confusion) are refused because only the configured one
/// is accepted.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    signing: Option<EncodingKey>,
    algorithm: Algorithm,
}

/// Where the verification key comes from.
pub enum KeySource<'a> {
    Secret(&'a [u8]),
    PublicKeyFile(&'a Path, Option<Algorithm>),
}

impl Verifier {
    pub fn new(
        source: KeySource<'_>,
        audience: &[String],
        issuer: &[String],
        leeway_secs: u64,
    ) -> Result<Verifier, AuthError> {
        let (key, algorithm, signing) = match source {
            KeySource::Secret(secret) => (
                DecodingKey::from_secret(secret),
                Algorithm::HS256,
                Some(EncodingKey::from_secret(secret)),
            ),
            KeySource::PublicKeyFile(path, algorithm) => {
                let pem = std::fs::read(path).map_err(|e| {
                    AuthError::Config(format!("cannot read {}: {e}", path.display()))
                })?;
                let algorithm = algorithm.unwrap_or_else(|| {
                    if DecodingKey::from_rsa_pem(&pem).is_ok() {
                        Algorithm::RS256
                    } else {
                        Algorithm::EdDSA
                    }
                });
                let key = match algorithm {
                    Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => {
                        DecodingKey::from_rsa_pem(&pem)
                    }
                    Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
                    Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem),
                    other => {
                        return Err(AuthError::Config(format!(
                            "{other:?} needs a shared secret, not a public key"
                        )))
                    }
                }
                .map_err(|e| AuthError::Config(format!("bad public key: {e}")))?;
                (key, algorithm, None)
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = leeway_secs;
        // jsonwebtoken ignores `nbf` unless asked; a token is not valid before it (when present).
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(audience);
            // jsonwebtoken checks `aud` only when the token has one: require it.
            validation.required_spec_claims.insert("aud".to_owned());
        }
        if !issuer.is_empty() {
            validation.iss = Some(issuer.iter().cloned().collect::<HashSet<_>>());
            validation.required_spec_claims.insert("iss".to_owned());
        }
        Ok(Verifier {
            key,
            validation,
            signing,
            algorithm,
        })
    }

    /// Verifies a token and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let data = decode::<Claims>(token, &self.key, &self.validation)?;
        // Ids with control characters are refused: the store keeps its own lists under one
        // (`storage::records::Snooze::TENANT`), out of every tenant's reach.
        let unusable = |id: &str| id.is_empty() || id.chars().any(char::is_control);
        if unusable(&data.claims.sub) || unusable(&data.claims.tenant) {
            return Err(AuthError::EmptyIdentity);
        }
        Ok(data.claims)
    }

    /// Signs claims with the configured secret (HS256 only: the server holds no private key).
    pub fn mint(&self, claims: &Claims) -> Result<String, AuthError> {
        let key = self.signing.as_ref().ok_or_else(|| {
            AuthError::Config("minting needs --jwt-secret (the server holds no private key)".into())
        })?;
        Ok(encode(&Header::new(self.algorithm), claims, key)?)
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Extracts the token from `Authorization: Bearer …` or the `token` query parameter.
pub fn token_from_request<B>(req: &hyper::Request<B>) -> Option<String> {
    if let Some(value) = req.headers().get(hyper::header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned());
    }
    let query = req.uri().query()?;
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        (name == "token").then(|| value.to_owned())
    })
}

/// Whether the claims allow joining an existing room (PROTOCOL.md §3 `join`): another tenant's
/// room is never visible; participants may join; admins and services any room of their tenant;
/// agents any conversation (support or prospect) of their tenant, as a shared inbox; a customer
/// only a conversation it takes part in.
pub fn may_join(claims: &Claims, room: &Room) -> Access {
    if room.tenant_id != claims.tenant {
        return Access::NotFound;
    }
    let participant = room.participants.iter().any(|p| p == &claims.sub);
    match claims.role {
        Role::Admin | Role::Service => Access::Allowed,
        Role::Customer if participant && room.kind != RoomKind::Team => Access::Allowed,
        Role::Customer => Access::NotFound,
        Role::Agent if room.kind != RoomKind::Team => Access::Allowed,
        _ if participant => Access::Allowed,
        _ => Access::Forbidden,
    }
}

/// The outcome of an access check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Allowed,
    Forbidden,
    NotFound,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(role: Role, exp: u64) -> Claims {
        Claims {
            sub: "u1".into(),
            tenant: "t1".into(),
            role,
            exp,
            name: None,
            aud: None,
            iss: None,
        }
    }

    #[test]
    fn mints_and_verifies_with_the_same_secret() {
        let v = Verifier::new(KeySource::Secret(b"secret"), &[], &[], 0).unwrap();
        let token = v.mint(&claims(Role::Agent, now_secs() + 60)).unwrap();
        assert_eq!(v.verify(&token).unwrap().role, Role::Agent);
        let other = Verifier::new(KeySource::Secret(b"other"), &[], &[], 0).unwrap();
        assert!(other.verify(&token).is_err());
    }

    #[test]
    fn refuses_expired_and_unsigned_tokens() {
        let v = Verifier::new(KeySource::Secret(b"secret"), &[], &[], 0).unwrap();
        let expired = v.mint(&claims(Role::Agent, now_secs() - 10)).unwrap();
        assert!(v.verify(&expired).is_err());
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64.encode(serde_json::to_vec(&claims(Role::Admin, now_secs() + 60)).unwrap());
        assert!(v.verify(&format!("{header}.{body}.")).is_err());
    }

    fn key(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/keys")
            .join(name)
    }

    fn sign(algorithm: Algorithm, key: &EncodingKey, claims: &Claims) -> String {
        encode(&Header::new(algorithm), claims, key).unwrap()
    }

    #[test]
    fn verifies_eddsa_and_rs256_tokens_with_a_public_key_file() {
        let c = claims(Role::User, now_secs() + 60);
        let ed_private = std::fs::read(key("ed25519-private.pem")).unwrap();
        let ed = Verifier::new(
            KeySource::PublicKeyFile(&key("ed25519-public.pem"), None),
            &[],
            &[],
            0,
        )
        .unwrap();
        let token = sign(
            Algorithm::EdDSA,
            &EncodingKey::from_ed_pem(&ed_private).unwrap(),
            &c,
        );
        assert_eq!(ed.verify(&token).unwrap().sub, "u1");

        let rsa_private = std::fs::read(key("rsa-private.pem")).unwrap();
        let rsa = Verifier::new(
            KeySource::PublicKeyFile(&key("rsa-public.pem"), None),
            &[],
            &[],
            0,
        )
        .unwrap();
        let token = sign(
            Algorithm::RS256,
            &EncodingKey::from_rsa_pem(&rsa_private).unwrap(),
            &c,
        );
        assert_eq!(rsa.verify(&token).unwrap().sub, "u1");
        // Each verifier accepts its own algorithm only.
        assert!(ed.verify(&token).is_err());
        // The server holds no private key, so it cannot mint.
        assert!(rsa.mint(&c).is_err());
    }

    #[test]
    fn refuses_algorithm_confusion_with_the_public_key_as_hmac_secret() {
        let public = std::fs::read(key("rsa-public.pem")).unwrap();
        let rsa = Verifier::new(
            KeySource::PublicKeyFile(&key("rsa-public.pem"), None),
            &[],
            &[],
            0,
        )
        .unwrap();
        let forged = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(&public),
            &claims(Role::Admin, now_secs() + 60),
        );
        assert!(rsa.verify(&forged).is_err());
    }

    #[test]
    fn checks_audience_and_issuer_when_configured() {
        let v = Verifier::new(
            KeySource::Secret(b"s"),
            &["chat".to_owned()],
            &["idp".to_owned()],
            0,
        )
        .unwrap();
        let mut c = claims(Role::User, now_secs() + 60);
        assert!(v.verify(&v.mint(&c).unwrap()).is_err());
        c.aud = Some("chat".into());
        c.iss = Some("idp".into());
        assert!(v.verify(&v.mint(&c).unwrap()).is_ok());
        // An array audience matches when any entry does.
        c.aud = Some(Audience::Many(vec!["billing".into(), "chat".into()]));
        assert!(v.verify(&v.mint(&c).unwrap()).is_ok());
        c.aud = Some(Audience::Many(vec!["billing".into()]));
        assert!(v.verify(&v.mint(&c).unwrap()).is_err());
        // Each is required on its own.
        c.aud = None;
        assert!(v.verify(&v.mint(&c).unwrap()).is_err());
        c.aud = Some("chat".into());
        c.iss = None;
        assert!(v.verify(&v.mint(&c).unwrap()).is_err());
    }
}
