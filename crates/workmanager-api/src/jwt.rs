//! JWT bearer tokens: the algorithm is pinned by configuration (a token
//! naming another one, or `none`, is refused — so an RS256 public key can
//! never be used as an HS256 secret), `iss`, `aud`, `exp` and `nbf` are
//! checked with a small leeway, and the role comes from a configurable claim.
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use crate::auth::{Principal, Role};

/// How tokens are verified.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// HS256, RS256 or ES256.
    pub algorithm: String,
    /// HS256: the shared secret.
    pub secret: Option<String>,
    /// RS256/ES256: a PEM public key.
    pub public_key_pem: Option<Vec<u8>>,
    /// RS256/ES256: a JWKS document (keys chosen by `kid`).
    pub jwks_json: Option<Vec<u8>>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Claim holding the role(s): a string or an array of strings.
    pub role_claim: String,
    pub leeway_seconds: u64,
}

enum Keys {
    One(DecodingKey),
    Set(Vec<(Option<String>, DecodingKey)>),
}

pub struct JwtVerifier {
    keys: Keys,
    validation: Validation,
    role_claim: String,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwtVerifier({:?})", self.validation.algorithms)
    }
}

impl JwtVerifier {
    pub fn new(s: &JwtSettings) -> Result<Self, String> {
        let alg = match s.algorithm.to_ascii_uppercase().as_str() {
            "HS256" => Algorithm::HS256,
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            other => {
                return Err(format!(
                    "Auth:Jwt:Algorithm {other:?} is not supported; use HS256, RS256 or ES256"
                ))
            }
        };
        let keys = match alg {
            Algorithm::HS256 => {
                let secret = s
                    .secret
                    .as_deref()
                    .filter(|x| x.len() >= 32)
                    .ok_or("Auth:Jwt:Secret must be set, at least 32 bytes, for HS256")?;
                Keys::One(DecodingKey::from_secret(secret.as_bytes()))
            }
            _ => match (&s.public_key_pem, &s.jwks_json) {
                (Some(pem), _) => Keys::One(
                    if alg == Algorithm::RS256 {
                        DecodingKey::from_rsa_pem(pem)
                    } else {
                        DecodingKey::from_ec_pem(pem)
                    }
                    .map_err(|e| format!("Auth:Jwt:PublicKeyPath is not a usable key: {e}"))?,
                ),
                (None, Some(json)) => {
                    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(json)
                        .map_err(|e| format!("Auth:Jwt:JwksPath is not a JWKS document: {e}"))?;
                    let mut keys = Vec::new();
                    for k in &set.keys {
                        let key = DecodingKey::from_jwk(k)
                            .map_err(|e| format!("Auth:Jwt:JwksPath has an unusable key: {e}"))?;
                        keys.push((k.common.key_id.clone(), key));
                    }
                    if keys.is_empty() {
                        return Err("Auth:Jwt:JwksPath holds no key".into());
                    }
                    Keys::Set(keys)
                }
                (None, None) => {
                    return Err(format!(
                        "Auth:Jwt:PublicKeyPath or Auth:Jwt:JwksPath must be set for {}",
                        s.algorithm
                    ))
                }
            },
        };
        let mut validation = Validation::new(alg);
        validation.leeway = s.leeway_seconds;
        validation.validate_nbf = true;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &s.issuer {
            Some(i) => validation.set_issuer(&[i]),
            None => validation.iss = None,
        }
        match &s.audience {
            Some(a) => validation.set_audience(&[a]),
            None => validation.validate_aud = false,
        }
        Ok(Self {
            keys,
            validation,
            role_claim: s.role_claim.clone(),
        })
    }

    /// The principal a valid token names; `Err` says why not (for tests and
    /// debug logs only: callers see one generic refusal).
    pub fn verify(&self, token: &str) -> Result<Principal, String> {
        let key = match &self.keys {
            Keys::One(k) => k,
            Keys::Set(set) => {
                let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
                match (&header.kid, set.len()) {
                    (Some(kid), _) => set
                        .iter()
                        .find(|(id, _)| id.as_deref() == Some(kid))
                        .map(|(_, k)| k)
                        .ok_or("unknown kid")?,
                    (None, 1) => &set[0].1,
                    (None, _) => return Err("a kid is required".into()),
                }
            }
        };
        let data = jsonwebtoken::decode::<Value>(token, key, &self.validation)
            .map_err(|e| e.to_string())?;
        let claims = data.claims;
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or("no sub")?;
        let role = match claims.get(&self.role_claim) {
            Some(Value::String(r)) => Role::parse(r),
            Some(Value::Array(rs)) => rs
                .iter()
                .filter_map(Value::as_str)
                .filter_map(Role::parse)
                .max(),
            _ => None,
        }
        .ok_or("no known role in the role claim")?;
        Ok(Principal {
            name: format!("jwt:{sub}"),
            role,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-hs256";

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    fn hs_settings() -> JwtSettings {
        JwtSettings {
            algorithm: "HS256".into(),
            secret: Some(SECRET.into()),
            public_key_pem: None,
            jwks_json: None,
            issuer: Some("https://issuer.test".into()),
            audience: Some("workmanager".into()),
            role_claim: "roles".into(),
            leeway_seconds: 5,
        }
    }

    fn claims() -> Value {
        json!({"sub": "alice", "iss": "https://issuer.test", "aud": "workmanager",
               "exp": now() + 600, "nbf": now() - 10, "roles": ["viewer", "operator"]})
    }

    fn hs(claims: &Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn with(f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
        let mut c = claims();
        f(c.as_object_mut().unwrap());
        c
    }

    #[test]
    fn a_valid_token_names_its_subject_and_highest_role() {
        let v = JwtVerifier::new(&hs_settings()).unwrap();
        let p = v.verify(&hs(&claims())).unwrap();
        assert_eq!((p.name.as_str(), p.role), ("jwt:alice", Role::Operator));
    }

    #[test]
    fn expired_early_wrong_audience_issuer_signature_or_role_are_refused() {
        let v = JwtVerifier::new(&hs_settings()).unwrap();
        let cases = [
            (
                "expired",
                hs(&with(|c| {
                    c.insert("exp".into(), json!(now() - 60));
                })),
            ),
            (
                "not yet valid",
                hs(&with(|c| {
                    c.insert("nbf".into(), json!(now() + 60));
                })),
            ),
            (
                "wrong aud",
                hs(&with(|c| {
                    c.insert("aud".into(), json!("someone-else"));
                })),
            ),
            (
                "wrong iss",
                hs(&with(|c| {
                    c.insert("iss".into(), json!("https://evil.test"));
                })),
            ),
            (
                "no exp",
                hs(&with(|c| {
                    c.remove("exp");
                })),
            ),
            (
                "no role",
                hs(&with(|c| {
                    c.insert("roles".into(), json!(["root"]));
                })),
            ),
            (
                "other secret",
                encode(
                    &Header::new(Algorithm::HS256),
                    &claims(),
                    &EncodingKey::from_secret(b"another-secret-of-thirty-two-bytes!!"),
                )
                .unwrap(),
            ),
        ];
        for (what, token) in cases {
            assert!(v.verify(&token).is_err(), "{what} must be refused");
        }
        // A flipped signature byte.
        let mut t = hs(&claims()).into_bytes();
        let last = t.len() - 2;
        t[last] = if t[last] == b'A' { b'B' } else { b'A' };
        assert!(v.verify(&String::from_utf8(t).unwrap()).is_err());
    }

    #[test]
    fn alg_none_and_algorithm_confusion_are_refused() {
        let b64 =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let none = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&claims())
        );
        let hs_v = JwtVerifier::new(&hs_settings()).unwrap();
        assert!(hs_v.verify(&none).is_err());

        // An ES256 verifier, and a token signed HS256 with its public key as the secret.
        let key = rcgen::KeyPair::generate().unwrap();
        let public_pem = key.public_key_pem();
        let es = JwtSettings {
            algorithm: "ES256".into(),
            secret: None,
            public_key_pem: Some(public_pem.clone().into_bytes()),
            ..hs_settings()
        };
        let es_v = JwtVerifier::new(&es).unwrap();
        let good = encode(
            &Header::new(Algorithm::ES256),
            &claims(),
            &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(es_v.verify(&good).unwrap().role, Role::Operator);
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &claims(),
            &EncodingKey::from_secret(public_pem.as_bytes()),
        )
        .unwrap();
        assert!(
            es_v.verify(&confused).is_err(),
            "HS256 signed with the public key"
        );
        assert!(es_v.verify(&none).is_err());
        // The HS verifier refuses the ES token too: the algorithm is pinned.
        assert!(hs_v.verify(&good).is_err());
    }

    #[test]
    fn jwks_keys_are_chosen_by_kid() {
        let key = rcgen::KeyPair::generate().unwrap();
        let enc = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
        // The JWK of the public key: x and y from the uncompressed point.
        let raw = key.public_key_raw();
        let (x, y) = (&raw[1..33], &raw[33..65]);
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256",
                                    "x": b64(x), "y": b64(y)}]});
        let s = JwtSettings {
            algorithm: "ES256".into(),
            secret: None,
            jwks_json: Some(jwks.to_string().into_bytes()),
            ..hs_settings()
        };
        let v = JwtVerifier::new(&s).unwrap();
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        assert!(v.verify(&encode(&h, &claims(), &enc).unwrap()).is_ok());
        h.kid = Some("k2".into());
        assert!(v.verify(&encode(&h, &claims(), &enc).unwrap()).is_err());
    }

    #[test]
    fn weak_or_missing_keys_fail_start_up() {
        let mut s = hs_settings();
        s.secret = Some("short".into());
        assert!(JwtVerifier::new(&s).is_err());
        s.algorithm = "none".into();
        assert!(JwtVerifier::new(&s).unwrap_err().contains("not supported"));
        s.algorithm = "RS256".into();
        assert!(JwtVerifier::new(&s).unwrap_err().contains("PublicKeyPath"));
    }
}
