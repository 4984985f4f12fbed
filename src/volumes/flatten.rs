//! Flatten jobs: each copies every chunk a clone does not own yet from its
//! parent snapshot into the clone, in the background, so that the clone no
//! longer needs the parent (which may then be deleted).
//!
//! Owns the job threads and what they report. The progress itself is the
//! clone's ownership map ([`Volume::flatten_progress`]), which is durable:
//! a job stopped by a shutdown or a crash resumes at the next start from
//! the chunks the map says are missing, because the clone's manifest keeps
//! `flattening` set until the job finished.
//!
//! Must never: keep a clone alive (a thread holds it only for one step, so
//! a delete is not refused for it), or declare a clone independent before
//! every chunk and its ownership are durable (the engine's
//! [`Volume::finish_flatten`] checks).

use super::error::VolumeError;
use crate::engine::Volume;
use crate::runtime::block_on;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

/// Chunks one step copies; a stop or shutdown waits for at most one step.
const STEP_CHUNKS: u64 = 256;

#[derive(Default)]
pub struct Flattens {
    jobs: Mutex<BTreeMap<String, Job>>,
}

struct Job {
    stop: Arc<AtomicBool>,
    /// `None` while running; then "done" or the error that ended it.
    outcome: Arc<Mutex<Option<Result<(), String>>>>,
    thread: Option<JoinHandle<()>>,
}

impl Flattens {
    /// Starts (or, after a restart, resumes) flattening `clone`.
    pub fn start(&self, clone: &Arc<Volume>) -> Result<(), VolumeError> {
        let name = clone.name().to_string();
        let mut jobs = self.jobs.lock().unwrap();
        if jobs
            .get(&name)
            .is_some_and(|j| j.outcome.lock().unwrap().is_none())
        {
            return Ok(());
        }
        block_on(clone.begin_flatten())?;
        let stop = Arc::new(AtomicBool::new(false));
        let outcome = Arc::new(Mutex::new(None));
        let weak = Arc::downgrade(clone);
        let thread = {
            let (stop, outcome, name) = (stop.clone(), outcome.clone(), name.clone());
            std::thread::Builder::new()
                .name(format!("flatten-{name}"))
                .spawn(move || {
                    let result = run(&weak, &stop);
                    match &result {
                        Ok(true) => log::info!("flatten of {name} finished"),
                        Ok(false) => log::info!("flatten of {name} stopped; it resumes at restart"),
                        Err(e) => log::error!("flatten of {name} failed: {e}"),
                    }
                    if let Ok(false) = result {
                        return;
                    }
                    *outcome.lock().unwrap() = Some(result.map(|_| ()));
                })?
        };
        jobs.insert(
            name,
            Job {
                stop,
                outcome,
                thread: Some(thread),
            },
        );
        Ok(())
    }

    /// What `volume info` shows of `clone`'s flatten.
    pub fn status(&self, clone: &Volume) -> Option<Value> {
        let jobs = self.jobs.lock().unwrap();
        let job = jobs.get(clone.name());
        let state = match job.map(|j| j.outcome.lock().unwrap().clone()) {
            None if clone.flattening() => "waiting".to_string(),
            None => return None,
            Some(None) => "running".to_string(),
            Some(Some(Ok(()))) => "done".to_string(),
            Some(Some(Err(e))) => format!("failed: {e}"),
        };
        let progress = clone.flatten_progress();
        Some(json!({
            "state": state,
            "copied_chunks": progress.map_or(0, |p| p.owned_chunks),
            "total_chunks": progress.map_or(0, |p| p.total_chunks),
        }))
    }

    /// Stops `clone`'s job, if any, and waits for its thread.
    pub fn stop(&self, clone: &str) {
        let job = self.jobs.lock().unwrap().remove(clone);
        if let Some(job) = job {
            join(job);
        }
    }

    /// Stops every job; unfinished ones resume at the next start.
    pub fn shutdown(&self) {
        let jobs = std::mem::take(&mut *self.jobs.lock().unwrap());
        jobs.into_values().for_each(join);
    }
}

fn join(mut job: Job) {
    job.stop.store(true, Ordering::Release);
    if let Some(t) = job.thread.take() {
        let _ = t.join();
    }
}

/// Copies step by step until every chunk is owned (`Ok(true)`), the clone
/// is gone or a stop is asked for (`Ok(false)`).
fn run(clone: &Weak<Volume>, stop: &AtomicBool) -> Result<bool, String> {
    let mut at = 0;
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(false);
        }
        let Some(vol) = clone.upgrade() else {
            return Ok(false);
        };
        match block_on(vol.flatten_step(at, STEP_CHUNKS)).map_err(|e| e.to_string())? {
            Some(next) => at = next,
            None => {
                block_on(vol.finish_flatten()).map_err(|e| e.to_string())?;
                return Ok(true);
            }
        }
    }
}
