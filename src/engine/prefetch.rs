//! Prefetch: while a layer computes, an I/O thread reads the experts the next layer will
//! probably choose. The engine predicts them by applying the next layer's router (and FFN
//! norm) to the current layer's residual stream — it changes little from one layer to the
//! next — and asks for those not resident. When the next layer routes, a predicted expert's
//! bytes are already in memory (or on their way); a misprediction costs a wasted read, never a
//! wrong result: the bytes come from the same shard offsets either way.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::scheduler::ExpertKey;
use crate::error::Result;
use crate::io::WatchedFile;

struct Request {
    key: ExpertKey,
    offset: u64,
    len: usize,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct PrefetchStats {
    /// Reads started for predicted experts.
    pub issued: u64,
    /// Of those, loads that found their bytes prefetched.
    pub used: u64,
    /// Prefetched experts the layer did not choose (or found resident after all).
    pub wasted: u64,
}

pub struct Prefetcher {
    tx: Option<Sender<Request>>,
    rx: Receiver<(ExpertKey, Result<Vec<u8>>)>,
    worker: Option<JoinHandle<()>>,
    in_flight: HashSet<ExpertKey>,
    ready: HashMap<ExpertKey, Result<Vec<u8>>>,
    pub stats: PrefetchStats,
}

impl Prefetcher {
    /// Start the I/O thread over the engine's shards (one per layer).
    pub fn new(shards: Arc<Vec<WatchedFile>>, drop_cache: bool) -> Prefetcher {
        let (tx, requests) = channel::<Request>();
        let (done, rx) = channel();
        let worker = std::thread::Builder::new()
            .name("sage-prefetch".into())
            .spawn(move || {
                for r in requests {
                    let shard = &shards[r.key.0 as usize];
                    let mut buf = Vec::new();
                    let res = shard.read_into(r.offset, r.len, &format!("expert {} (prefetch)", r.key.1), &mut buf);
                    if drop_cache {
                        shard.drop_cached(r.offset, r.len);
                    }
                    if done.send((r.key, res.map(|_| buf))).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning the prefetch thread");
        Prefetcher {
            tx: Some(tx),
            rx,
            worker: Some(worker),
            in_flight: HashSet::new(),
            ready: HashMap::new(),
            stats: PrefetchStats::default(),
        }
    }

    /// Start reading `key`'s record (`len` bytes at `offset` of its layer's shard) unless it
    /// is already on its way.
    pub fn request(&mut self, key: ExpertKey, offset: u64, len: usize) {
        if self.in_flight.contains(&key) || self.ready.contains_key(&key) {
            return;
        }
        if let Some(tx) = &self.tx {
            if tx.send(Request { key, offset, len }).is_ok() {
                self.in_flight.insert(key);
                self.stats.issued += 1;
            }
        }
    }

    /// The bytes of `key` if they were prefetched, waiting for a read still in flight; None if
    /// nobody asked for them.
    pub fn take(&mut self, key: ExpertKey) -> Option<Result<Vec<u8>>> {
        if let Some(r) = self.ready.remove(&key) {
            self.stats.used += 1;
            return Some(r);
        }
        if !self.in_flight.contains(&key) {
            return None;
        }
        while let Ok((k, r)) = self.rx.recv() {
            self.in_flight.remove(&k);
            if k == key {
                self.stats.used += 1;
                return Some(r);
            }
            self.ready.insert(k, r);
        }
        None
    }

    /// Drop what was prefetched for layers other than `layer` and `layer + 1`
    /// (mispredictions), so at most two layers' predictions are held.
    pub fn retire_all_but(&mut self, layer: u32) {
        while let Ok((k, r)) = self.rx.try_recv() {
            self.in_flight.remove(&k);
            self.ready.insert(k, r);
        }
        let before = self.ready.len();
        self.ready.retain(|k, _| k.0 == layer || k.0 == layer + 1);
        self.stats.wasted += (before - self.ready.len()) as u64;
    }

    /// Bytes held in prefetched records.
    pub fn held_bytes(&self) -> usize {
        self.ready.values().map(|r| r.as_ref().map_or(0, |b| b.capacity())).sum()
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.tx.take(); // ends the worker's loop
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
