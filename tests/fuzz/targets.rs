// The bodies of the fuzz targets, shared by `tests/fuzz/fuzz_targets/*.rs` (libFuzzer, nightly) and
// `tests/fuzz_replay.rs` (every saved input, on stable, in `cargo test`). Each one panics on a
// broken property; an error result for hostile input is the expected outcome, not a failure.

use frostbyte_gitops::domain::json::SecretPaths;
use frostbyte_gitops::domain::plan::{ActualTenant, PlanOptions, plan};
use frostbyte_gitops::domain::render::{self, Header};
use frostbyte_gitops::domain::tenant::DesiredTenant;
use frostbyte_gitops::sops::{AgeKeys, Format};
use frostbyte_gitops::source::{Body, SourceFile};
use frostbyte_gitops::sync::{ReadOptions, decode_file};
use serde_json::Value;

const FORMATS: [(Format, &str); 3] = [(Format::Toml, "toml"), (Format::Json, "json"), (Format::Yaml, "yaml")];

fn keys() -> AgeKeys {
    let mut k = AgeKeys::default();
    k.add_text(include_str!("../fixtures/keys/test.agekey"), "test.agekey")
        .expect("the test key parses");
    k
}

/// First byte: the format; the rest: a tenant file, decoded as a sync would (parse, decrypt with
/// the test key when it has sops metadata, check). Every problem must name the file, and no
/// message may carry a control character.
pub fn decode(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else { return };
    let (_, ext) = FORMATS[selector as usize % 3];
    let path = format!("tenants/fuzz.{ext}");
    let file = SourceFile::new(path.clone(), Body::Bytes(body.to_vec()));
    let keys = keys();
    let opts = ReadOptions {
        keys: &keys,
        decrypt: selector & 0x20 == 0,
        allow_plaintext: selector & 0x80 != 0,
        require_tenant_recipient: selector & 0x40 != 0,
        progress: false,
        keep_documents: true,
    };
    if let Err(issues) = decode_file(&file, &opts) {
        assert!(!issues.is_empty());
        for issue in issues {
            assert_eq!(issue.file, path);
            let shown = issue.to_string();
            assert!(!shown.chars().any(|c| c.is_control()), "an unescaped control character in {shown:?}");
        }
    }
}

/// Any document the YAML reader accepts is written by the YAML writer so that it reads back the same.
pub fn yaml_roundtrip(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let parsed = [
        frostbyte_gitops::parse::yaml(text),
        frostbyte_gitops::parse::json(text),
        frostbyte_gitops::parse::toml(text),
    ];
    for doc in parsed.into_iter().flatten() {
        let written = frostbyte_gitops::parse::to_yaml(&doc);
        let back = frostbyte_gitops::parse::yaml(&written).unwrap_or_else(|e| panic!("our own YAML does not read back: {e:?}\n{written}"));
        assert_eq!(back, doc, "\n{written}");
    }
}

/// Two documents (the input split at the first NUL) as git's and the database's: the plan over
/// them renders as text with no control character but line breaks, and as Markdown whose table
/// rows all have four cells.
pub fn render(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (a, b) = text.split_once('\0').unwrap_or((text, "{}"));
    let (Ok(a), Ok(b)) = (frostbyte_gitops::parse::json(a), frostbyte_gitops::parse::json(b)) else {
        return;
    };
    let desired = DesiredTenant::new("fuzz|`\u{1b}".into(), "tenants/fu`zz|.json".into(), &a, SecretPaths::new());
    let actual = ActualTenant {
        tenant_id: desired.tenant_id.clone(),
        state: "active".into(),
        config_version: 1,
        document: frostbyte_gitops::domain::json::JsonText::of(&b),
        applied: None,
        known_secrets: SecretPaths::new(),
        updated_at: None,
    };
    let p = plan(
        std::slice::from_ref(&desired),
        std::slice::from_ref(&actual),
        PlanOptions {
            key: &[7; 32],
            correct_drift: true,
        },
    );
    let header = Header {
        commit: Some("0123456789abcdef".into()),
        against: "the database".into(),
        signature: Some("REFUSED (head): signer `x|y`: \u{1b}[2J".into()),
    };
    let text = render::plan_text(&p, &header, false);
    assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text:?}");
    let md = render::plan_markdown(&p, &header);
    assert!(!md.chars().any(|c| c.is_control() && c != '\n'), "{md:?}");
    for row in md.lines().filter(|l| l.starts_with('|')) {
        assert_eq!(row.replace("\\|", "").matches('|').count(), 5, "a forged cell in {row:?}");
    }
    let _: Value = render::plan_json(&p, &header);
}

/// Where the block YAML reader answers, it reads what yaml-rust2 reads: the same tree with its
/// keys in the same order, or the same refusal with the same line and pointer.
pub fn yaml_fast_path(data: &[u8]) {
    same_reading(data, frostbyte_gitops::parse::yaml, frostbyte_gitops::parse::yaml_full);
}

/// Where the simple TOML reader answers, it reads what the `toml` crate reads.
pub fn toml_fast_path(data: &[u8]) {
    same_reading(data, frostbyte_gitops::parse::toml, frostbyte_gitops::parse::toml_full);
}

type Reader = fn(&str) -> Result<Value, frostbyte_gitops::parse::ParseError>;

fn same_reading(data: &[u8], read: Reader, full: Reader) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (read, full) = (read(text), full(text));
    assert_eq!(read, full, "{text:?}");
    if let (Ok(a), Ok(b)) = (read, full) {
        assert_eq!(a.to_string(), b.to_string(), "{text:?}");
    }
}
