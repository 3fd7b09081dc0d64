//! Notifications: a signed JSON POST to each configured receiver when a sync applied, failed or
//! was refused, or a drift report found drift. Bodies are built from plans and error lines, which
//! carry no secret; receivers are shown by host only (a Slack webhook's path is its credential).
//! Delivery is retried with backoff and bounded in time, and its failure never fails a run.

use crate::domain::escape::shown_url;
use crate::domain::plan::{Action, Entries};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::time::Duration;

/// Attempts per delivery, the wait before each retry, and the time one attempt may take: a
/// delivery is over within about 10 seconds whatever the receiver does.
const ATTEMPTS: u32 = 3;
const BACKOFF: [Duration; 2] = [Duration::from_millis(500), Duration::from_millis(1500)];
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// Tenants named in one body; the rest are counted.
const MAX_TENANTS: usize = 100;

/// Stops a walk of a plan's entries once a body names as many tenants as it may.
#[derive(Debug, thiserror::Error)]
#[error("enough tenants named")]
struct Enough;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("notifications[{index}] secret_file {path}")]
    SecretFile {
        index: usize,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("notifications[{index}] secret_file {path} is empty")]
    EmptySecret { index: usize, path: String },
    #[error("building the HTTP client")]
    Client(#[source] reqwest::Error),
}

/// What a receiver subscribes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    /// A sync or apply wrote something.
    Applied,
    /// A run failed (invalid files, a database or git error).
    Failed,
    /// A run was refused on policy: an untrusted commit, a rewritten history, a mass prune.
    Refused,
    /// A drift report found tenants out of sync.
    Drift,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Failed => "failed",
            Self::Refused => "refused",
            Self::Drift => "drift",
        }
    }
}

/// The body a receiver takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Generic,
    /// A Slack incoming-webhook body (`{"text": ...}`).
    Slack,
}

/// One receiver: where, with which key, for which events, in which format.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub url: String,
    /// The HMAC key for `X-Frostbyte-Signature-256`, read when the notifier is built.
    pub secret_file: Option<std::path::PathBuf>,
    pub events: Vec<Event>,
    pub format: Format,
}

/// Sent as the user agent of every delivery.
const USER_AGENT: &str = concat!("frostbyte-gitops/", env!("CARGO_PKG_VERSION"));

/// What happened, for the receivers.
#[derive(Debug, Clone)]
pub struct Notification {
    pub event: Event,
    pub source: String,
    pub commit: Option<String>,
    pub counts: BTreeMap<String, usize>,
    /// (tenant_id, action), at most [`MAX_TENANTS`] of them.
    pub tenants: Vec<(String, String)>,
    pub more_tenants: usize,
    /// The first line of the error, for `failed` and `refused`.
    pub error: Option<String>,
}

impl Notification {
    /// A run that wrote: what it did to which tenants (read from the plan's entries).
    pub fn applied(source: &str, commit: Option<&str>, plan: &impl Entries) -> std::io::Result<Notification> {
        let s = plan.summary();
        let counts = [
            ("created", s.create),
            ("updated", s.update),
            ("decommissioned", s.decommission),
            ("orphaned", s.orphaned),
        ];
        let written = s.create + s.update + s.decommission;
        let mut changed: Vec<(String, String)> = Vec::with_capacity(written.min(MAX_TENANTS));
        // The entries are read only until the body has its tenants: the rest are counted by the
        // summary, and a first sync's created tenants are read back from a file.
        let walked = plan.try_for_each_window(&mut |window| {
            let listed = window
                .iter()
                .filter(|t| matches!(t.action, Action::Create | Action::Update | Action::Decommission));
            changed.extend(listed.take(MAX_TENANTS - changed.len()).map(|t| {
                let action = serde_json::to_value(t.action).expect("serialisable");
                (t.tenant_id.clone(), action.as_str().unwrap_or_default().to_string())
            }));
            match changed.len() == MAX_TENANTS {
                true => Err(std::io::Error::other(Enough)),
                false => Ok(()),
            }
        });
        match walked {
            Err(e) if !e.get_ref().is_some_and(|e| e.is::<Enough>()) => return Err(e),
            _ => {}
        }
        let mut n = Notification::new(Event::Applied, source, commit, &counts, changed);
        n.more_tenants = written - n.tenants.len();
        Ok(n)
    }

    /// A run that failed or was refused, at `commit` when it got that far; `error` is said on one
    /// line (the caller puts the first problem of a list on it).
    pub fn failed(event: Event, source: &str, commit: Option<&str>, error: &str) -> Notification {
        let mut n = Notification::new(event, source, commit, &[], vec![]);
        n.error = Some(error.lines().next().unwrap_or_default().chars().take(500).collect());
        n
    }

    /// A drift report that found tenants out of sync: the classes counted, the drifted tenants named.
    pub fn drift(source: &str, commit: Option<&str>, report: &[crate::domain::drift::TenantDrift]) -> Notification {
        let counts: Vec<(&str, usize)> = crate::domain::drift::counts(report).into_iter().map(|(k, v)| (k.as_str(), v)).collect();
        let drifted = report
            .iter()
            .filter(|t| !t.in_sync())
            .map(|t| (t.tenant_id.clone(), t.classes.iter().map(|c| c.as_str()).collect::<Vec<_>>().join("+")))
            .collect();
        Notification::new(Event::Drift, source, commit, &counts, drifted)
    }

    fn new(event: Event, source: &str, commit: Option<&str>, counts: &[(&str, usize)], mut tenants: Vec<(String, String)>) -> Notification {
        let more_tenants = tenants.len().saturating_sub(MAX_TENANTS);
        tenants.truncate(MAX_TENANTS);
        Notification {
            event,
            source: source.to_string(),
            commit: commit.map(str::to_string),
            counts: counts.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            tenants,
            more_tenants,
            error: None,
        }
    }

    pub fn body(&self, format: Format) -> Value {
        match format {
            Format::Generic => json!({
                "event": self.event,
                "source": self.source,
                "commit": self.commit,
                "counts": self.counts,
                "tenants": self.tenants.iter().map(|(id, action)| json!({"tenant_id": id, "action": action})).collect::<Vec<_>>(),
                "more_tenants": self.more_tenants,
                "error": self.error,
            }),
            Format::Slack => json!({"text": self.slack_text()}),
        }
    }

    fn slack_text(&self) -> String {
        let commit = self.commit.as_deref().map(|c| format!(" at `{}`", &c[..c.len().min(12)])).unwrap_or_default();
        let mut text = format!("frostbyte-gitops: *{}* for source `{}`{commit}", self.event.as_str(), self.source);
        if !self.counts.is_empty() {
            let counts: Vec<String> = self.counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
            text.push_str(&format!(": {}", counts.join(", ")));
        }
        if let Some(e) = &self.error {
            text.push_str(&format!("\n> {e}"));
        }
        for (id, action) in &self.tenants {
            text.push_str(&format!("\n• `{id}` {action}"));
        }
        if self.more_tenants > 0 {
            text.push_str(&format!("\n… and {} more", self.more_tenants));
        }
        text
    }
}

/// `sha256=<hex>`: HMAC-SHA256 of the body under the receiver's key, as GitHub signs webhooks.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("hmac takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

struct Receiver {
    url: String,
    /// Scheme and host: what logs and errors show.
    shown: String,
    key: Option<Vec<u8>>,
    events: Vec<Event>,
    format: Format,
}

/// How one delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    Failed,
}

pub struct Notifier {
    receivers: Vec<Receiver>,
    /// Built only when there is a receiver: loading the TLS roots is start-up cost every command
    /// would otherwise pay.
    client: Option<reqwest::Client>,
}

impl Notifier {
    /// Reads each receiver's key file; an unreadable or empty one is refused, naming it.
    pub fn new(configs: &[Target]) -> Result<Notifier, NotifyError> {
        let mut receivers = Vec::new();
        for (index, c) in configs.iter().enumerate() {
            let key = match &c.secret_file {
                None => None,
                Some(path) => {
                    let shown = path.display().to_string();
                    let text = std::fs::read(path).map_err(|source| NotifyError::SecretFile {
                        index,
                        path: shown.clone(),
                        source,
                    })?;
                    let key = text.trim_ascii().to_vec();
                    if key.is_empty() {
                        return Err(NotifyError::EmptySecret { index, path: shown });
                    }
                    Some(key)
                }
            };
            receivers.push(Receiver {
                shown: shown_url(&c.url),
                url: c.url.clone(),
                key,
                events: c.events.clone(),
                format: c.format,
            });
        }
        if receivers.is_empty() {
            return Ok(Notifier { receivers, client: None });
        }
        let client = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .connect_timeout(ATTEMPT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(NotifyError::Client)?;
        Ok(Notifier {
            receivers,
            client: Some(client),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.receivers.is_empty()
    }

    /// Sends `n` to every receiver that asked for its event, all at once; each delivery retried and
    /// bounded. Returns how each ended.
    pub async fn send(&self, n: &Notification) -> Vec<Delivery> {
        let sends = self.receivers.iter().filter(|r| r.events.contains(&n.event)).map(|r| self.deliver(r, n));
        futures_util::future::join_all(sends).await
    }

    async fn deliver(&self, r: &Receiver, n: &Notification) -> Delivery {
        let client = self.client.as_ref().expect("a client whenever there is a receiver");
        let body = serde_json::to_vec(&n.body(r.format)).expect("serialisable");
        let signature = r.key.as_ref().map(|k| signature(k, &body));
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(BACKOFF[(attempt - 1) as usize]).await;
            }
            let mut req = client
                .post(&r.url)
                .header("content-type", "application/json")
                .header("user-agent", USER_AGENT)
                .header("x-frostbyte-event", n.event.as_str())
                .body(body.clone());
            if let Some(s) = &signature {
                req = req.header("x-frostbyte-signature-256", s);
            }
            match req.send().await {
                Ok(resp) if resp.status().is_success() => {
                    tracing::debug!(receiver = %r.shown, event = n.event.as_str(), "notification delivered");
                    return Delivery::Delivered;
                }
                Ok(resp) => tracing::warn!(receiver = %r.shown, status = resp.status().as_u16(), attempt = attempt + 1, "notification refused"),
                // Without the URL: a Slack webhook's path is its credential.
                Err(e) => tracing::warn!(receiver = %r.shown, cause = %cause(&e), attempt = attempt + 1, "notification not delivered"),
            }
        }
        tracing::warn!(receiver = %r.shown, event = n.event.as_str(), "notification given up after {ATTEMPTS} attempts");
        Delivery::Failed
    }
}

/// Why a delivery failed, in words: timed out, the connection refused or reset, TLS, with the
/// innermost cause's text. Never the URL: a Slack webhook's path is its credential, and only
/// reqwest's outermost error names the URL.
fn cause(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    let mut inner: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    let mut last = None;
    while let Some(c) = inner {
        last = Some(c.to_string());
        inner = c.source();
    }
    match last {
        Some(why) => format!("{kind}: {why}"),
        None => kind.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn receivers_are_shown_without_path_or_credentials() {
        assert_eq!(shown_url("https://hooks.slack.com/services/T0/B0/secret"), "https://hooks.slack.com");
        assert_eq!(shown_url("http://user:pw@localhost:9000/x?token=1"), "http://localhost:9000");
    }

    /// An applied plan names its first hundred written tenants and counts the rest, without
    /// reading the entries past them.
    #[test]
    fn an_applied_body_reads_only_the_entries_it_names() {
        use crate::domain::plan::{Plan, Summary, TenantPlan, WINDOW};
        use std::borrow::Cow;
        struct Counted(Plan, std::cell::Cell<usize>);
        impl Entries for Counted {
            fn summary(&self) -> Summary {
                self.0.summary()
            }
            fn try_for_each_window(&self, f: &mut dyn FnMut(&[Cow<'_, TenantPlan>]) -> std::io::Result<()>) -> std::io::Result<()> {
                self.0.try_for_each_window(&mut |w| {
                    self.1.set(self.1.get() + 1);
                    f(w)
                })
            }
        }
        let entry = |i: usize, action: Action| {
            let mut t = TenantPlan::unchanged(format!("t{i:05}"), format!("tenants/t{i:05}.toml"), 1, "d".into());
            t.action = action;
            t
        };
        // 50 unchanged, then 3 windows' worth of creates.
        let tenants = (0..50)
            .map(|i| entry(i, Action::Unchanged))
            .chain((50..50 + 3 * WINDOW).map(|i| entry(i, Action::Create)));
        let plan = Counted(Plan { tenants: tenants.collect() }, Default::default());
        let n = Notification::applied("eu", None, &plan).unwrap();
        assert_eq!(n.tenants.len(), MAX_TENANTS);
        assert_eq!(n.tenants[0], ("t00050".to_string(), "create".to_string()));
        assert_eq!(n.more_tenants, 3 * WINDOW - MAX_TENANTS);
        assert_eq!(n.counts["created"], 3 * WINDOW);
        assert_eq!(plan.1.get(), 1, "windows read");
        let small = Notification::applied(
            "eu",
            None,
            &Plan {
                tenants: vec![entry(1, Action::Update), entry(2, Action::Unchanged)],
            },
        )
        .unwrap();
        assert_eq!((small.tenants.len(), small.more_tenants), (1, 0));
    }

    #[test]
    fn bodies_name_at_most_a_hundred_tenants() {
        let tenants: Vec<(String, String)> = (0..150).map(|i| (format!("t{i}"), "create".to_string())).collect();
        let n = Notification::new(Event::Applied, "eu", Some("377f5f3efb2413fb"), &[("created", 150)], tenants);
        let body = n.body(Format::Generic);
        assert_eq!(body["tenants"].as_array().unwrap().len(), 100);
        assert_eq!(body["more_tenants"], json!(50));
        assert_eq!(body["event"], json!("applied"));
        let slack = n.body(Format::Slack);
        assert!(
            slack["text"]
                .as_str()
                .unwrap()
                .contains("*applied* for source `eu` at `377f5f3efb24`: 150 created")
        );
    }
}
