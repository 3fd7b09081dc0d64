//! The plans of the tenants an apply creates, kept in a temporary file from the moment their
//! chunk is written until the run's report reads them back: a first sync of 100,000 tenants held
//! about 110 MB of them (the redacted values of every field) until it printed them.

use crate::domain::plan::{Entries, Packed, Plan, Summary, TenantPlan, WINDOW};
use crate::store::CreatedSink;
use rayon::prelude::*;
use std::borrow::Cow;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};

/// [`Packed`] plans in the order they were written: tenant order, as an apply writes its tenants.
/// The file has no name, so nothing else opens it, and it is gone with the run.
#[derive(Default)]
pub struct Spill {
    file: Option<BufWriter<File>>,
    summary: Summary,
}

impl CreatedSink for Spill {
    fn take(&mut self, chunk: Packed) -> io::Result<()> {
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(BufWriter::new(tempfile::tempfile()?)),
        };
        file.write_all(&chunk.lines)?;
        self.summary += chunk.summary;
        Ok(())
    }
}

impl Spill {
    /// Done writing: what is buffered goes to the file, to be read back.
    pub fn finish(self) -> io::Result<Spilled> {
        let file = self.file.map(BufWriter::into_inner).transpose().map_err(io::IntoInnerError::into_error)?;
        Ok(Spilled { file, summary: self.summary })
    }
}

/// A finished [`Spill`], read back as often as a report needs it.
#[derive(Default)]
pub struct Spilled {
    file: Option<File>,
    summary: Summary,
}

impl Spilled {
    /// Whether no plan was spilled.
    pub fn is_empty(&self) -> bool {
        self.summary == Summary::default()
    }

    /// The plans, a window at a time, each window's lines decoded on all cores.
    fn try_for_each_window(&self, f: &mut dyn FnMut(Vec<TenantPlan>) -> io::Result<()>) -> io::Result<()> {
        let Some(file) = &self.file else { return Ok(()) };
        let mut lines = BufReader::new(ReadAt { file, pos: 0 }).split(b'\n');
        loop {
            let window = lines.by_ref().take(WINDOW).collect::<io::Result<Vec<_>>>()?;
            if window.is_empty() {
                return Ok(());
            }
            let plans = window.par_iter().map(|l| Packed::unpack(l)).collect::<serde_json::Result<Vec<_>>>()?;
            f(plans)?;
        }
    }
}

/// Reads a file from `pos` on without moving the file's own offset, so that each reading has its
/// own and none disturbs another.
struct ReadAt<'f> {
    file: &'f File,
    pos: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(self.file, buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A run's plan: the entries it holds, and those of the tenants it created, read back from their
/// spill; both in tenant order, and merged in it.
pub struct Merged<'a> {
    pub plan: &'a Plan,
    pub created: &'a Spilled,
}

impl Entries for Merged<'_> {
    fn summary(&self) -> Summary {
        let mut s = self.plan.summary();
        s += self.created.summary;
        s
    }

    fn try_for_each_window(&self, f: &mut dyn FnMut(&[Cow<'_, TenantPlan>]) -> io::Result<()>) -> io::Result<()> {
        let mut held = self.plan.tenants.iter().peekable();
        let mut window = Vec::with_capacity(WINDOW);
        self.created.try_for_each_window(&mut |spilled| {
            for t in spilled {
                while let Some(h) = held.next_if(|h| h.tenant_id < t.tenant_id) {
                    push(Cow::Borrowed(h), &mut window, f)?;
                }
                push(Cow::Owned(t), &mut window, f)?;
            }
            Ok(())
        })?;
        for h in held {
            push(Cow::Borrowed(h), &mut window, f)?;
        }
        match window.is_empty() {
            true => Ok(()),
            false => f(&window),
        }
    }
}

/// Adds `t` to `window`, and hands a full window to `f`.
fn push<'t>(t: Cow<'t, TenantPlan>, window: &mut Vec<Cow<'t, TenantPlan>>, f: &mut dyn FnMut(&[Cow<'_, TenantPlan>]) -> io::Result<()>) -> io::Result<()> {
    window.push(t);
    if window.len() == WINDOW {
        f(window)?;
        window.clear();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::plan::Action;

    fn packed(plans: &[TenantPlan]) -> Packed {
        let mut p = Packed::default();
        plans.iter().for_each(|t| p.push(t));
        p
    }

    fn entry(i: usize, action: Action) -> TenantPlan {
        let mut t = TenantPlan::unchanged(format!("t-{i:06}"), format!("tenants/t-{i:06}.toml"), 1, "d".into());
        t.action = action;
        t
    }

    /// Held and spilled entries come out as one list in tenant order, across windows, with the
    /// counts of both; a spill read twice gives the same.
    #[test]
    fn held_and_spilled_entries_merge_in_tenant_order() {
        let n = 2 * WINDOW + 7;
        let plan = Plan {
            tenants: (0..n).filter(|i| i % 3 != 0).map(|i| entry(i, Action::Unchanged)).collect(),
        };
        let mut spill = Spill::default();
        let created: Vec<TenantPlan> = (0..n).filter(|i| i % 3 == 0).map(|i| entry(i, Action::Create)).collect();
        for chunk in created.chunks(500) {
            spill.take(packed(chunk)).unwrap();
        }
        let spilled = spill.finish().unwrap();
        assert!(!spilled.is_empty());
        assert!(Spill::default().finish().unwrap().is_empty());
        let merged = Merged {
            plan: &plan,
            created: &spilled,
        };
        for _ in 0..2 {
            let mut seen = Vec::new();
            merged
                .try_for_each_window(&mut |w| {
                    assert!(w.len() <= WINDOW);
                    seen.extend(w.iter().map(|t| (t.tenant_id.clone(), t.action)));
                    Ok(())
                })
                .unwrap();
            let expected: Vec<(String, Action)> = (0..n)
                .map(|i| (format!("t-{i:06}"), if i % 3 == 0 { Action::Create } else { Action::Unchanged }))
                .collect();
            assert_eq!(seen, expected);
        }
        let s = merged.summary();
        assert_eq!((s.create, s.unchanged), (created.len(), plan.tenants.len()));
        assert_eq!(spilled.summary.create, created.len());
    }

    /// What is read back is what was written, field for field.
    #[test]
    fn spilled_plans_read_back_whole() {
        let mut t = entry(1, Action::Create);
        t.patch = crate::domain::plan::create_patch(&serde_json::json!({"config": {"a": [1, "x"]}, "endpoints": {}}), &Default::default());
        t.next_version = Some(1);
        let mut spill = Spill::default();
        spill.take(packed(std::slice::from_ref(&t))).unwrap();
        let spilled = spill.finish().unwrap();
        let mut back = Vec::new();
        spilled
            .try_for_each_window(&mut |w| {
                back.extend(w);
                Ok(())
            })
            .unwrap();
        assert_eq!(back, [t]);
    }
}
