//! Shared consistency points for a replicated consistency group
//! (`replicate start --group GROUP`): every member's link takes its CP
//! snapshot at the same instant and under the same number, so the
//! replica's `cp-N` of every member are one point in time.
//!
//! How: a member's sender whose CP falls due (its timer, a request, a
//! session's first CP) arrives at the group's rendezvous and nudges the
//! other members to arrive too (a CP request each). The last to arrive
//! raises every member's write barrier (new hooked writes wait, those in
//! flight finish; with all raised, no write is in progress on any member),
//! takes the members' `.repl-cp-N` snapshots together with the group's
//! write barrier ([`Volume::create_snapshots_together`]), splits every
//! member's epoch there and lowers the barriers; each sender then ships its
//! own CP N. N is the highest number any member needs (each destination
//! replica accepts any CP above the one it applied) and above the group's
//! previous one, so the numbers stay shared after a member reconnects.
//!
//! A member whose destination is unreachable never arrives: the others wait
//! at the rendezvous (their writes go on into the log, then the dirty map),
//! and the group's CPs resume when it is back; `replicate status --group`
//! shows who waits.
//!
//! Must never: take a member's CP snapshot while a write is in progress on
//! another member, or give two members different numbers for one instant.

use super::source::{cp_snapshot_name, Link};
use crate::engine::Volume;
use crate::runtime::block_on;
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// How often a member waiting at the rendezvous checks that it should go on.
const WAIT_CHECK: Duration = Duration::from_millis(200);

pub struct GroupCps {
    name: String,
    members: Vec<String>,
    state: Mutex<Rendezvous>,
    cond: Condvar,
}

#[derive(Default)]
struct Rendezvous {
    /// Each member's link, once opened.
    links: BTreeMap<String, Weak<Link>>,
    /// This round's arrivals: the number each needs, when its CP fell due.
    arrived: BTreeMap<String, (u64, Instant)>,
    round: u64,
    /// The last round's outcome.
    outcome: Option<(u64, Result<u64, String>)>,
    last: Option<u64>,
}

impl GroupCps {
    pub fn new(name: &str, members: &[String]) -> Arc<GroupCps> {
        Arc::new(GroupCps {
            name: name.to_string(),
            members: members.to_vec(),
            state: Mutex::new(Rendezvous::default()),
            cond: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Rendezvous> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `link` a member's link (before its sender starts).
    pub fn register(&self, volume: &str, link: &Arc<Link>) {
        self.lock()
            .links
            .insert(volume.to_string(), Arc::downgrade(link));
    }

    /// The members not waiting at the rendezvous now (for status).
    pub fn waiting_for(&self) -> Vec<String> {
        let st = self.lock();
        if st.arrived.is_empty() {
            return Vec::new();
        }
        self.members
            .iter()
            .filter(|m| !st.arrived.contains_key(*m))
            .cloned()
            .collect()
    }

    /// `me`'s CP fell due (`due`), needing number `wanted` at least: waits
    /// for every member, takes all their CP snapshots at one instant and
    /// returns the number they share.
    pub fn rendezvous(&self, me: &Link, wanted: u64, due: Instant) -> Result<u64, String> {
        let name = me.volume().name().to_string();
        let mut st = self.lock();
        let round = st.round;
        st.arrived.insert(name.clone(), (wanted, due));
        if st.arrived.len() < self.members.len() {
            let others: Vec<Arc<Link>> = st
                .links
                .iter()
                .filter(|(m, _)| !st.arrived.contains_key(*m))
                .filter_map(|(_, l)| l.upgrade())
                .collect();
            drop(st);
            for l in others {
                l.request_cp();
            }
            st = self.lock();
            loop {
                if st.round != round {
                    return match &st.outcome {
                        Some((r, outcome)) if *r == round => outcome.clone(),
                        _ => Err("the group's consistency point went missing".into()),
                    };
                }
                if me.stopping() {
                    st.arrived.remove(&name);
                    return Err("the replication link was stopped".into());
                }
                st = self
                    .cond
                    .wait_timeout(st, WAIT_CHECK)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        // The last to arrive takes everyone's CP; the others wait on the lock.
        let number = st
            .arrived
            .values()
            .map(|(w, _)| *w)
            .chain(st.last.map(|l| l + 1))
            .max()
            .unwrap_or(wanted);
        let members: Vec<(Arc<Link>, Instant)> = st
            .arrived
            .iter()
            .filter_map(|(m, (_, due))| Some((st.links.get(m)?.upgrade()?, *due)))
            .collect();
        let outcome = if members.len() == self.members.len() {
            self.take_together(&members, number)
        } else {
            Err(format!(
                "group {}: a member's link is gone; restart the group's replication",
                self.name
            ))
        };
        if outcome.is_ok() {
            st.last = Some(number);
        }
        st.arrived.clear();
        st.round += 1;
        st.outcome = Some((round, outcome.clone()));
        drop(st);
        self.cond.notify_all();
        outcome
    }

    /// Every member's CP snapshot `number` under the group's write barrier.
    fn take_together(&self, members: &[(Arc<Link>, Instant)], number: u64) -> Result<u64, String> {
        let mut raised = Vec::new();
        let mut result = Ok(());
        for (link, due) in members {
            match link.raise_barrier() {
                Ok(()) => raised.push((link, *due)),
                Err(e) => {
                    result = Err(format!("{}: {e}", link.volume().name()));
                    break;
                }
            }
        }
        let name = cp_snapshot_name(number);
        if result.is_ok() {
            let pairs: Vec<(&Volume, &str)> = members
                .iter()
                .map(|(l, _)| (&**l.volume(), &*name))
                .collect();
            result = block_on(Volume::create_snapshots_together(&pairs))
                .map(|_| ())
                .map_err(|e| format!("cannot take snapshot {name} of group {}: {e}", self.name));
        }
        for (link, due) in raised {
            link.split_epoch(number, due, result.is_ok());
        }
        if result.is_ok() {
            log::info!(
                "group {}: consistency point {number} taken on {}",
                self.name,
                self.members.join(", ")
            );
        }
        result.map(|()| number)
    }
}
