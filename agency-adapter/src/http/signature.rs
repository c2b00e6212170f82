//! Webhook signatures: `X-Yeongye-Signature: <hex HMAC-SHA256 of the raw body>`, keyed with the
//! webhook secret (the file named by `http.webhook_secret_file`, trimmed). The agency system
//! recomputes it over the bytes it received and compares in constant time.
//!
//! ```text
//! python3 -c 'import hmac,hashlib,sys; print(hmac.new(KEY, BODY, hashlib.sha256).hexdigest())'
//! ```

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "X-Yeongye-Signature";

type HmacSha256 = Hmac<Sha256>;

/// The lowercase hex HMAC-SHA256 of `body` under `secret`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Whether `signature` (hex, either case) is the HMAC-SHA256 of `body` under `secret`. Compares
/// in constant time.
pub fn verify(secret: &[u8], body: &[u8], signature: &str) -> bool {
    let Ok(expected) = hex::decode(signature.trim()) else {
        return false;
    };
    let Ok(mut mac) = HmacSha256::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

/// SHA-256 of `bytes` (for comparing bearer tokens without a data-dependent early exit, and for
/// fingerprinting requests).
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_4231_case_2() {
        let sig = sign(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(verify(b"Jefe", b"what do ya want for nothing?", &sig));
        assert!(verify(
            b"Jefe",
            b"what do ya want for nothing?",
            &sig.to_uppercase()
        ));
    }

    #[test]
    fn tampering_fails() {
        let sig = sign(b"secret-secret-secret", b"{\"a\":1}");
        assert!(verify(b"secret-secret-secret", b"{\"a\":1}", &sig));
        assert!(!verify(b"secret-secret-secret", b"{\"a\":2}", &sig));
        assert!(!verify(b"other-secret-xxxxxx", b"{\"a\":1}", &sig));
        assert!(!verify(b"secret-secret-secret", b"{\"a\":1}", "zz"));
        assert!(!verify(b"secret-secret-secret", b"{\"a\":1}", ""));
        assert!(!verify(b"secret-secret-secret", b"{\"a\":1}", &sig[..62]));
    }
}
