//! Decoded documents parked in a temporary file between their decoding and their use. An apply
//! decodes its files before it takes the lock, and then held every document (about 600 bytes of
//! text a tenant, 58 MB at 100,000) until it was compared with its row or its chunk was written.
//! Parked, a tenant holds where its document is. The documents hold decrypted secrets, so each is
//! sealed (AES-256-GCM) under a key that exists only in this process; the file has no name, so
//! nothing else opens it, and it is gone with the run.

use crate::domain::json::JsonText;
use crate::domain::tenant::Parked;
use crate::store::ParkedDocuments;
use aes_gcm::aead::{AeadInPlace, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Nonce};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

const TAG: usize = 16;

pub struct Parking {
    file: File,
    cipher: Aes256Gcm,
    /// Where the next document goes; each writer reserves its bytes, then writes them.
    end: AtomicU64,
}

impl Parking {
    pub fn new() -> io::Result<Parking> {
        Ok(Parking {
            file: tempfile::tempfile()?,
            cipher: Aes256Gcm::new(&Aes256Gcm::generate_key(OsRng)),
            end: AtomicU64::new(0),
        })
    }

    /// Seals and writes `document` (from any thread), and says where it is.
    pub fn park(&self, document: &JsonText) -> io::Result<Parked> {
        let mut sealed = Vec::with_capacity(document.as_str().len() + TAG);
        sealed.extend_from_slice(document.as_str().as_bytes());
        let len = u32::try_from(sealed.len() + TAG).map_err(|_| io::Error::other("a document too large to park"))?;
        let offset = self.end.fetch_add(u64::from(len), Ordering::Relaxed);
        // The offset is the nonce: each is used once under this process's key.
        let tag = self
            .cipher
            .encrypt_in_place_detached(&nonce(offset), b"", &mut sealed)
            .map_err(|_| io::Error::other("sealing a parked document"))?;
        sealed.extend_from_slice(&tag);
        self.file.write_all_at(&sealed, offset)?;
        Ok(Parked { offset, len })
    }
}

impl ParkedDocuments for Parking {
    /// The document parked at `at`.
    fn fetch(&self, at: Parked) -> io::Result<JsonText> {
        let mut sealed = vec![0; at.len as usize];
        self.file.read_exact_at(&mut sealed, at.offset)?;
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("a parked document {what}"));
        let split = sealed.len().checked_sub(TAG).ok_or_else(|| bad("is truncated"))?;
        let tag = aes_gcm::Tag::clone_from_slice(&sealed[split..]);
        sealed.truncate(split);
        self.cipher
            .decrypt_in_place_detached(&nonce(at.offset), b"", &mut sealed, &tag)
            .map_err(|_| bad("failed its check"))?;
        let text = String::from_utf8(sealed).map_err(|_| bad("is not UTF-8"))?;
        JsonText::from_text(text).map_err(|_| bad("is not JSON"))
    }
}

fn nonce(offset: u64) -> Nonce<aes_gcm::aead::consts::U12> {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&offset.to_le_bytes());
    n.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn documents_come_back_as_parked_from_any_thread_and_the_file_holds_no_plaintext() {
        let parking = Parking::new().unwrap();
        let docs: Vec<JsonText> = (0..200)
            .map(|i| JsonText::of(&json!({"config": {"secrets": {"k": format!("hunter2-{i}")}}})))
            .collect();
        let at: Vec<Parked> = std::thread::scope(|s| {
            let handles: Vec<_> = docs
                .chunks(50)
                .map(|c| s.spawn(|| c.iter().map(|d| parking.park(d).unwrap()).collect::<Vec<_>>()))
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        for (d, at) in docs.iter().zip(&at).rev() {
            assert_eq!(parking.fetch(*at).unwrap(), *d);
        }
        let mut file = Vec::new();
        io::Read::read_to_end(&mut &parking.file, &mut file).unwrap();
        assert_eq!(file.len() as u64, parking.end.load(Ordering::Relaxed));
        assert!(!file.windows(7).any(|w| w == b"hunter2"), "a parked document is sealed");
    }

    #[test]
    fn a_changed_byte_or_a_wrong_place_is_refused() {
        let parking = Parking::new().unwrap();
        let (a, b) = (JsonText::of(&json!({"a": 1})), JsonText::of(&json!({"b": 2})));
        let (at_a, at_b) = (parking.park(&a).unwrap(), parking.park(&b).unwrap());
        let mut byte = [0u8];
        parking.file.read_exact_at(&mut byte, at_b.offset).unwrap();
        parking.file.write_all_at(&[byte[0] ^ 1], at_b.offset).unwrap();
        let e = parking.fetch(at_b).unwrap_err();
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            (io::ErrorKind::InvalidData, "a parked document failed its check")
        );
        let shifted = Parked {
            offset: at_a.offset + 1,
            ..at_a
        };
        assert_eq!(parking.fetch(shifted).unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(parking.fetch(at_a).unwrap(), a);
    }
}
