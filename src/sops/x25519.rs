//! An age X25519 identity that keeps its own public key.
//!
//! age's `x25519::Identity` derives its public key (a scalar multiplication) every time it
//! unwraps a stanza, to salt the key derivation: 17 of an unwrap's 77 us, an eighth of the CPU
//! `validate` spends on a tenant file. This one derives it once. The stanza rules are age's (the X25519
//! recipient stanza of c2sp.org/age): one canonical base64 argument of 32 bytes, a 32-byte body,
//! a shared secret that is not all zeros; a body that does not open is "not for this identity".

use age::DecryptError;
use age::secrecy::ExposeSecret;
use age_core::format::{FileKey, Stanza};
use age_core::primitives::{aead_decrypt, hkdf};
use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

const TAG: &str = "X25519";
const LABEL: &[u8] = b"age-encryption.org/v1/X25519";
const FILE_KEY_BYTES: usize = 16;

#[derive(Clone)]
pub(super) struct Unwrapper {
    secret: StaticSecret,
    public: PublicKey,
}

impl Unwrapper {
    pub(super) fn new(id: &age::x25519::Identity) -> Unwrapper {
        let mut raw = secret_bytes(id);
        let secret = StaticSecret::from(raw);
        zeroize::Zeroize::zeroize(&mut raw);
        let public = PublicKey::from(&secret);
        Unwrapper { secret, public }
    }
}

/// The identity's scalar, read back from its own Bech32 encoding (age gives no other way out).
fn secret_bytes(id: &age::x25519::Identity) -> [u8; 32] {
    use bech32::FromBase32;
    let text = id.to_string();
    let (_, data, _) = bech32::decode(text.expose_secret()).expect("age writes valid Bech32");
    let bytes = Zeroizing::new(Vec::<u8>::from_base32(&data).expect("age writes whole bytes"));
    bytes[..].try_into().expect("an X25519 scalar is 32 bytes")
}

impl age::Identity for Unwrapper {
    fn unwrap_stanza(&self, stanza: &Stanza) -> Option<Result<FileKey, DecryptError>> {
        if stanza.tag != TAG {
            return None;
        }
        let invalid = Some(Err(DecryptError::InvalidHeader));
        let (Some(share), Ok(body)) = (share(&stanza.args), <&[u8; 32]>::try_from(&stanza.body[..])) else {
            return invalid;
        };
        let share = PublicKey::from(share);
        let shared = self.secret.diffie_hellman(&share);
        if !shared.was_contributory() {
            return invalid;
        }
        let mut salt = [0; 64];
        salt[..32].copy_from_slice(share.as_bytes());
        salt[32..].copy_from_slice(self.public.as_bytes());
        let key = Zeroizing::new(hkdf(&salt, LABEL, shared.as_bytes()));
        let opened = Zeroizing::new(aead_decrypt(&key, FILE_KEY_BYTES, body).ok()?);
        Some(Ok(FileKey::init_with_mut(|k| k.copy_from_slice(&opened))))
    }
}

/// The ephemeral share: exactly one argument, 32 bytes in canonical unpadded base64.
fn share(args: &[String]) -> Option<[u8; 32]> {
    let [arg] = args else { return None };
    // One byte of room, so that a longer argument fails instead of filling the buffer.
    let mut buf = [0; 33];
    match STANDARD_NO_PAD.decode_slice(arg, &mut buf) {
        Ok(32) => buf[..32].try_into().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::str::FromStr;

    fn encrypt_to(recipient: &age::x25519::Recipient, plain: &[u8]) -> Vec<u8> {
        let encryptor = age::Encryptor::with_recipients(std::iter::once(recipient as &dyn age::Recipient)).unwrap();
        let mut out = vec![];
        let mut w = encryptor.wrap_output(&mut out).unwrap();
        w.write_all(plain).unwrap();
        w.finish().unwrap();
        out
    }

    fn decrypt_with(identity: &dyn age::Identity, file: &[u8]) -> Result<Vec<u8>, DecryptError> {
        let d = age::Decryptor::new_buffered(file).unwrap();
        let mut out = vec![];
        d.decrypt(std::iter::once(identity))?.read_to_end(&mut out).unwrap();
        Ok(out)
    }

    #[test]
    fn opens_what_age_opens_and_nothing_else() {
        let ours = age::x25519::Identity::generate();
        let unwrapper = Unwrapper::new(&ours);
        // The public key it keeps is the one age's recipient encodes.
        let (_, data, _) = bech32::decode(&ours.to_public().to_string()).unwrap();
        let recipient = <Vec<u8> as bech32::FromBase32>::from_base32(&data).unwrap();
        assert_eq!(unwrapper.public.as_bytes()[..], recipient[..]);
        let file = encrypt_to(&ours.to_public(), b"a data key of 32 bytes, exactly.");
        assert_eq!(decrypt_with(&unwrapper, &file).unwrap(), decrypt_with(&ours, &file).unwrap());
        assert_eq!(decrypt_with(&unwrapper, &file).unwrap(), b"a data key of 32 bytes, exactly.");

        let other = age::x25519::Identity::generate();
        let theirs = encrypt_to(&other.to_public(), b"not ours");
        assert!(matches!(decrypt_with(&unwrapper, &theirs), Err(DecryptError::NoMatchingKeys)));
        assert!(matches!(decrypt_with(&ours, &theirs), Err(DecryptError::NoMatchingKeys)));
    }

    #[test]
    fn opens_the_data_keys_the_sops_cli_wrote() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        let text = std::fs::read_to_string(format!("{dir}/keys/test.agekey")).unwrap();
        let id = age::x25519::Identity::from_str(text.lines().find(|l| l.starts_with("AGE-SECRET-KEY-1")).unwrap()).unwrap();
        let (unwrapper, recipient) = (Unwrapper::new(&id), id.to_public().to_string());
        let mut opened = 0;
        for entry in std::fs::read_dir(format!("{dir}/sops")).unwrap() {
            let path = entry.unwrap().path();
            if !path.to_string_lossy().ends_with(".sops.json") {
                continue;
            }
            let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            for stanza in doc["sops"]["age"].as_array().unwrap() {
                if stanza["recipient"] != recipient.as_str() {
                    continue;
                }
                let armored = stanza["enc"].as_str().unwrap().as_bytes();
                let file = |armored| age::armor::ArmoredReader::new(armored);
                let ours = age::Decryptor::new_buffered(file(armored)).unwrap();
                let theirs = age::Decryptor::new_buffered(file(armored)).unwrap();
                let (mut a, mut b) = (vec![], vec![]);
                ours.decrypt(std::iter::once(&unwrapper as &dyn age::Identity))
                    .unwrap()
                    .read_to_end(&mut a)
                    .unwrap();
                theirs.decrypt(std::iter::once(&id as &dyn age::Identity)).unwrap().read_to_end(&mut b).unwrap();
                assert_eq!((a.len(), &a), (32, &b), "{}", path.display());
                opened += 1;
            }
        }
        assert!(opened >= 7, "{opened}");
    }

    /// What an identity made of a stanza, comparable across identities.
    fn outcome(r: Option<Result<FileKey, DecryptError>>) -> String {
        match r {
            None => "not ours".into(),
            Some(Ok(k)) => format!("{:?}", k.expose_secret()),
            Some(Err(e)) => format!("{e:?}"),
        }
    }

    #[test]
    fn mutated_stanzas_get_what_age_gives_them() {
        use age::Recipient;
        use rand::{Rng, SeedableRng};
        let id = age::x25519::Identity::generate();
        let unwrapper = Unwrapper::new(&id);
        let file_key = FileKey::new(Box::new([7; FILE_KEY_BYTES]));
        let (stanzas, _) = id.to_public().wrap_file_key(&file_key).unwrap();
        let valid = &stanzas[0];
        assert_eq!(outcome(age::Identity::unwrap_stanza(&unwrapper, valid)), format!("{:?}", [7u8; FILE_KEY_BYTES]));
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_ ";
        let mut kinds = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            let mut s = Stanza {
                tag: valid.tag.clone(),
                args: valid.args.clone(),
                body: valid.body.clone(),
            };
            match rng.gen_range(0..5) {
                0 => {
                    let i = rng.gen_range(0..s.body.len());
                    s.body[i] ^= 1 << rng.gen_range(0..8);
                }
                1 => s.body.truncate(rng.gen_range(0..s.body.len())),
                2 => s.body.push(rng.r#gen()),
                3 => {
                    let mut share = s.args[0].clone().into_bytes();
                    let i = rng.gen_range(0..share.len());
                    share[i] = alphabet[rng.gen_range(0..alphabet.len())];
                    s.args[0] = String::from_utf8(share).unwrap();
                }
                _ => {
                    let cut = rng.gen_range(0..=s.args[0].len());
                    s.args[0].truncate(cut);
                }
            }
            let ours = outcome(age::Identity::unwrap_stanza(&unwrapper, &s));
            assert_eq!(ours, outcome(age::Identity::unwrap_stanza(&id, &s)), "{:?} {:?}", s.args, s.body);
            kinds.insert(ours);
        }
        // Both kinds of failure were met (a mutation that leaves the stanza as it was opens it).
        assert!(kinds.contains("InvalidHeader") && kinds.contains("not ours"), "{kinds:?}");
    }

    fn non_canonical(share: &str) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let last = ALPHABET.iter().position(|&c| c == *share.as_bytes().last().unwrap()).unwrap();
        format!("{}{}", &share[..42], ALPHABET[last | 1] as char)
    }

    #[test]
    fn malformed_stanzas_are_refused_as_age_refuses_them() {
        let id = age::x25519::Identity::generate();
        let unwrapper = Unwrapper::new(&id);
        let share = STANDARD_NO_PAD.encode(PublicKey::from(&StaticSecret::random_from_rng(rand::rngs::OsRng)).as_bytes());
        let stanza = |tag: &str, args: Vec<String>, body: Vec<u8>| Stanza { tag: tag.into(), args, body };
        let cases = [
            stanza(TAG, vec![], vec![0; 32]),
            stanza(TAG, vec![share.clone(), share.clone()], vec![0; 32]),
            stanza(TAG, vec![format!("{share}=")], vec![0; 32]),
            stanza(TAG, vec![share[..42].to_string()], vec![0; 32]),
            // The same bytes with a trailing bit set: not canonical.
            stanza(TAG, vec![non_canonical(&share)], vec![0; 32]),
            stanza(TAG, vec![format!("{share}AA")], vec![0; 32]),
            stanza(TAG, vec![share.clone()], vec![0; 31]),
            stanza(TAG, vec![share.clone()], vec![0; 33]),
            // The identity point: every secret gives an all-zero shared secret.
            stanza(TAG, vec![STANDARD_NO_PAD.encode([0u8; 32])], vec![0; 32]),
        ];
        for s in &cases {
            assert!(
                matches!(age::Identity::unwrap_stanza(&unwrapper, s), Some(Err(DecryptError::InvalidHeader))),
                "{:?}",
                s.args
            );
            assert!(
                matches!(age::Identity::unwrap_stanza(&id, s), Some(Err(DecryptError::InvalidHeader))),
                "{:?}",
                s.args
            );
        }
        // Another recipient type, and a well-formed stanza for someone else: not ours, not an error.
        for s in [stanza("scrypt", vec![share.clone()], vec![0; 32]), stanza(TAG, vec![share], vec![0; 32])] {
            assert!(age::Identity::unwrap_stanza(&unwrapper, &s).is_none());
            assert!(age::Identity::unwrap_stanza(&id, &s).is_none());
        }
    }
}
