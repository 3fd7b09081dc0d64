//! What the agent exposes on /metrics, in Prometheus text format.

use crate::domain::drift::DriftClass;
use crate::notify::Delivery;
use std::collections::BTreeMap;
use std::fmt::Write;

/// How a sync run ended: the `outcome` label of the run counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RunOutcome {
    Success,
    /// Failed for a reason that passes (the database, the git remote): retried with backoff.
    Failure,
    /// Refused for a reason retrying cannot change (invalid files, an untrusted commit, ...):
    /// waits for the next commit, trigger or interval.
    Refused,
}

impl RunOutcome {
    const ALL: [RunOutcome; 3] = [RunOutcome::Success, RunOutcome::Failure, RunOutcome::Refused];

    fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Success => "success",
            RunOutcome::Failure => "failure",
            RunOutcome::Refused => "refused",
        }
    }
}

/// What became of a notification: the `outcome` label of the notification counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum NotificationOutcome {
    Delivered,
    Failed,
    /// Never sent: too many were in flight.
    Dropped,
}

impl NotificationOutcome {
    const ALL: [NotificationOutcome; 3] = [NotificationOutcome::Delivered, NotificationOutcome::Failed, NotificationOutcome::Dropped];

    fn as_str(self) -> &'static str {
        match self {
            NotificationOutcome::Delivered => "delivered",
            NotificationOutcome::Failed => "failed",
            NotificationOutcome::Dropped => "dropped",
        }
    }
}

impl From<Delivery> for NotificationOutcome {
    fn from(d: Delivery) -> Self {
        match d {
            Delivery::Delivered => NotificationOutcome::Delivered,
            Delivery::Failed => NotificationOutcome::Failed,
        }
    }
}

/// Upper bounds of the sync duration histogram, in seconds.
const BUCKETS: [f64; 12] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

#[derive(Debug, Default, Clone)]
pub struct Metrics {
    runs: BTreeMap<RunOutcome, u64>,
    buckets: [u64; BUCKETS.len()],
    duration_sum: f64,
    duration_count: u64,
    pub tenants_applied: u64,
    pub last_applied_commit_time: Option<i64>,
    pub last_sync_ok: Option<bool>,
    pub last_sync_error: Option<String>,
    pub drift: BTreeMap<DriftClass, usize>,
    pub validation_errors: usize,
    /// Tenants left alone at the last sync because git and a hand edit both changed them.
    pub conflicts: usize,
    /// Whether the last sync was refused for its commit's signature.
    pub commit_refused: bool,
    /// Whether the last failed round failed for a reason that passes (else it was refused).
    pub last_sync_transient: bool,
    /// When the last full run (every file and row read) succeeded.
    pub last_full: Option<std::time::Instant>,
    pub leader: bool,
    /// Whether a first attempt to take the apply lease was made: before it, the replica is
    /// neither leader nor standby, and not ready.
    pub lease_checked: bool,
    /// Per configured source, by name.
    pub sources: BTreeMap<String, SourceMetrics>,
    pub notifications: BTreeMap<NotificationOutcome, u64>,
}

#[derive(Debug, Default, Clone)]
pub struct SourceMetrics {
    /// This replica holds the source's lease.
    pub leader: bool,
    pub runs_ok: u64,
    pub runs_failed: u64,
    pub applied: u64,
    pub last_success: Option<i64>,
    pub last_duration: f64,
    /// The last error, so that a failure is announced once, not at every retry.
    pub last_error: Option<String>,
    /// The drifted tenants last announced, so that unchanged drift is not announced again.
    pub last_drift: String,
}

impl Metrics {
    pub fn record_run(&mut self, outcome: RunOutcome, seconds: f64) {
        *self.runs.entry(outcome).or_default() += 1;
        for (i, le) in BUCKETS.iter().enumerate() {
            if seconds <= *le {
                self.buckets[i] += 1;
            }
        }
        self.duration_sum += seconds;
        self.duration_count += 1;
    }

    fn runs(&self, outcome: RunOutcome) -> u64 {
        self.runs.get(&outcome).copied().unwrap_or(0)
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        family(&mut o, "frostbyte_sync_runs_total", "counter", "Sync runs by outcome.");
        for outcome in RunOutcome::ALL {
            let _ = writeln!(o, "frostbyte_sync_runs_total{{outcome=\"{}\"}} {}", outcome.as_str(), self.runs(outcome));
        }
        family(&mut o, "frostbyte_sync_duration_seconds", "histogram", "Duration of sync runs.");
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(o, "frostbyte_sync_duration_seconds_bucket{{le=\"{le}\"}} {}", self.buckets[i]);
        }
        let _ = writeln!(o, "frostbyte_sync_duration_seconds_bucket{{le=\"+Inf\"}} {}", self.duration_count);
        let _ = writeln!(o, "frostbyte_sync_duration_seconds_sum {}", self.duration_sum);
        let _ = writeln!(o, "frostbyte_sync_duration_seconds_count {}", self.duration_count);
        one(
            &mut o,
            "frostbyte_tenants_applied_total",
            "counter",
            "Tenant changes written.",
            self.tenants_applied,
        );
        if let Some(t) = self.last_applied_commit_time {
            let help = "Commit time of the revision the database is at.";
            one(&mut o, "frostbyte_last_applied_commit_timestamp_seconds", "gauge", help, t);
        }
        family(&mut o, "frostbyte_tenants", "gauge", "Tenants by drift class, as of the last sync.");
        for class in DriftClass::ALL {
            let n = self.drift.get(&class).copied().unwrap_or(0);
            let _ = writeln!(o, "frostbyte_tenants{{drift=\"{}\"}} {n}", class.as_str());
        }
        let help = "Problems in the tenant files at the last sync.";
        one(&mut o, "frostbyte_validation_errors", "gauge", help, self.validation_errors);
        let help = "Tenants changed both in git and outside git, left alone (drift policy warn).";
        one(&mut o, "frostbyte_conflicts", "gauge", help, self.conflicts);
        let help = "1 when the last sync was refused: its commit lacks a good signature by a trusted signer.";
        one(&mut o, "frostbyte_commit_refused", "gauge", help, u8::from(self.commit_refused));
        if let Some(t) = self.last_full {
            let help = "Seconds since the last full run (every file and row read) succeeded.";
            one(
                &mut o,
                "frostbyte_full_sync_age_seconds",
                "gauge",
                help,
                format!("{:.3}", t.elapsed().as_secs_f64()),
            );
        }
        one(
            &mut o,
            "frostbyte_leader",
            "gauge",
            "1 when this replica holds the apply lease.",
            u8::from(self.leader),
        );
        self.render_sources(&mut o);
        family(&mut o, "frostbyte_notifications_total", "counter", "Notification deliveries by outcome.");
        for outcome in NotificationOutcome::ALL {
            let n = self.notifications.get(&outcome).copied().unwrap_or(0);
            let _ = writeln!(o, "frostbyte_notifications_total{{outcome=\"{}\"}} {n}", outcome.as_str());
        }
        o
    }

    fn render_sources(&self, o: &mut String) {
        type Field = fn(&SourceMetrics) -> String;
        let families: [(&str, &str, &str, Field); 4] = [
            (
                "frostbyte_source_leader",
                "gauge",
                "1 on the replica that holds the source's lease and syncs it, 0 elsewhere.",
                |m| u8::from(m.leader).to_string(),
            ),
            (
                "frostbyte_source_tenants_applied_total",
                "counter",
                "Tenant changes this replica wrote for the source.",
                |m| m.applied.to_string(),
            ),
            (
                "frostbyte_source_sync_duration_seconds",
                "gauge",
                "Duration of this replica's last sync of the source.",
                |m| format!("{:.3}", m.last_duration),
            ),
            (
                "frostbyte_source_last_success_timestamp_seconds",
                "gauge",
                "When this replica last synced the source successfully (0: never).",
                |m| m.last_success.unwrap_or(0).to_string(),
            ),
        ];
        for (name, kind, help, field) in families {
            family(o, name, kind, help);
            for (source, m) in &self.sources {
                let _ = writeln!(o, "{name}{{source=\"{source}\"}} {}", field(m));
            }
        }
        let help = "Syncs of the source by this replica, by outcome.";
        family(o, "frostbyte_source_sync_runs_total", "counter", help);
        for (source, m) in &self.sources {
            let _ = writeln!(o, "frostbyte_source_sync_runs_total{{source=\"{source}\",outcome=\"success\"}} {}", m.runs_ok);
            let _ = writeln!(
                o,
                "frostbyte_source_sync_runs_total{{source=\"{source}\",outcome=\"failure\"}} {}",
                m.runs_failed
            );
        }
    }
}

/// A metric family's HELP and TYPE lines.
fn family(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A family of one unlabelled sample.
fn one(o: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    family(o, name, kind, help);
    let _ = writeln!(o, "{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut m = Metrics::default();
        m.record_run(RunOutcome::Success, 0.03);
        m.record_run(RunOutcome::Failure, 3.0);
        let text = m.render();
        assert!(text.contains("frostbyte_sync_duration_seconds_bucket{le=\"0.025\"} 0"));
        assert!(text.contains("frostbyte_sync_duration_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("frostbyte_sync_duration_seconds_bucket{le=\"5\"} 2"));
        assert!(text.contains("frostbyte_sync_duration_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("frostbyte_sync_runs_total{outcome=\"failure\"} 1"));
    }

    /// Every label value is rendered, zero or not, in the names dashboards query.
    #[test]
    fn labels_are_rendered_for_every_value() {
        let mut m = Metrics::default();
        m.drift.insert(DriftClass::Modified, 2);
        *m.notifications.entry(Delivery::Failed.into()).or_default() += 1;
        *m.notifications.entry(NotificationOutcome::Dropped).or_default() += 3;
        let text = m.render();
        for line in [
            "frostbyte_tenants{drift=\"in-sync\"} 0",
            "frostbyte_tenants{drift=\"modified\"} 2",
            "frostbyte_tenants{drift=\"orphaned\"} 0",
            "frostbyte_notifications_total{outcome=\"delivered\"} 0",
            "frostbyte_notifications_total{outcome=\"failed\"} 1",
            "frostbyte_notifications_total{outcome=\"dropped\"} 3",
            "frostbyte_sync_runs_total{outcome=\"success\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
    }
}
