//! The I/O thread: reads expert records from the shards while the engine computes, for two
//! kinds of request. Reads ahead of a batch's known misses (while one missed expert is copied
//! into its slot, the next ones are already being read), and reads of experts the next layer
//! is predicted to choose (`predict`): for a decode step into buffers the loads take them
//! from; for a batch straight into arena slots reserved for them (`request_into`), while this
//! layer's experts compute on others; the next layer waits for those
//! (`finish_slot_reads`) before it uses any slot. A misprediction costs a wasted read, never
//! a wrong result: the bytes come from the same shard offsets either way.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::scheduler::ExpertKey;
use crate::error::{Error, Result};
use crate::ggml::HostWriter;
use crate::io::{Record, WatchedFile};

struct Request {
    key: ExpertKey,
    offset: u64,
    len: usize,
    /// Read the record into the arena here instead of returning it: a writer, a byte offset
    /// and the room there (a slot).
    into: Option<(HostWriter, usize, usize)>,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct PrefetchStats {
    /// Reads started for predicted experts.
    pub issued: u64,
    /// Of those, loads that found their bytes prefetched.
    pub used: u64,
    /// Prefetched experts the layer did not choose (or found resident after all).
    pub wasted: u64,
    /// Reads started ahead of a batch's known misses (not predictions).
    pub read_ahead: u64,
    /// Predicted experts not read because recent predictions were mostly wrong.
    pub skipped: u64,
    /// Of the reads started for predicted experts, those straight into reserved arena slots
    /// (a batch's). Their use is counted when a load finds the expert resident in its slot,
    /// and as wasted when the slot is evicted first.
    pub into_arena: u64,
}

/// Why a read into a slot never happened: the I/O thread is gone.
fn io_thread_stopped() -> Error {
    Error::Usage("the I/O thread has stopped".into())
}

pub struct Prefetcher {
    tx: Option<Sender<Request>>,
    rx: Receiver<(ExpertKey, Result<Record>)>,
    /// Buffers handed back for the I/O thread to read into again.
    spare: Sender<Record>,
    worker: Option<JoinHandle<()>>,
    in_flight: HashSet<ExpertKey>,
    ready: HashMap<ExpertKey, Result<Record>>,
    /// Reads into arena slots not reported done yet, and those that failed.
    slot_reads: HashSet<ExpertKey>,
    slot_failed: Vec<(ExpertKey, Error)>,
    /// Requests that were predictions (counted as used or wasted).
    predicted: HashSet<ExpertKey>,
    pub stats: PrefetchStats,
}

impl Prefetcher {
    /// Start the I/O thread over the engine's shards (one per layer).
    pub fn new(shards: Arc<Vec<WatchedFile>>, drop_cache: bool) -> Prefetcher {
        let (tx, requests) = channel::<Request>();
        let (done, rx) = channel();
        let (spare, spares) = channel::<Record>();
        let worker = std::thread::Builder::new()
            .name("sage-io".into())
            .spawn(move || {
                for r in requests {
                    let shard = &shards[r.key.0 as usize];
                    let what = format!("expert {} (read ahead)", r.key.1);
                    let res = match r.into {
                        Some((arena, at, room)) => arena
                            .fill(at, room, |slot| shard.read_record_to(r.offset, r.len, &what, drop_cache, slot))
                            .map(|_| Record::default()),
                        None => {
                            let mut rec = spares.try_recv().unwrap_or_default();
                            shard.read_record(r.offset, r.len, &what, drop_cache, &mut rec).map(|_| rec)
                        }
                    };
                    if done.send((r.key, res)).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning the prefetch thread");
        Prefetcher {
            tx: Some(tx),
            rx,
            spare,
            worker: Some(worker),
            in_flight: HashSet::new(),
            ready: HashMap::new(),
            slot_reads: HashSet::new(),
            slot_failed: Vec::new(),
            predicted: HashSet::new(),
            stats: PrefetchStats::default(),
        }
    }

    /// Start reading `key`'s record (`len` bytes at `offset` of its layer's shard) unless it
    /// is already on its way. `predicted`: a guess (counted in `issued`, then `used` or
    /// `wasted`), else a load known to come (`read_ahead`).
    pub fn request(&mut self, key: ExpertKey, offset: u64, len: usize, predicted: bool) {
        if self.in_flight.contains(&key) || self.ready.contains_key(&key) {
            return;
        }
        if let Some(tx) = &self.tx {
            if tx.send(Request { key, offset, len, into: None }).is_ok() {
                self.in_flight.insert(key);
                if predicted {
                    self.predicted.insert(key);
                    self.stats.issued += 1;
                } else {
                    self.stats.read_ahead += 1;
                }
            }
        }
    }

    /// Start reading `key`'s record (`len` bytes at `offset` of its layer's shard) straight
    /// into the arena through `arena`, at byte `at` with `room` bytes there: a slot the
    /// scheduler reserved for it, which nothing reads until `finish_slot_reads` returns.
    pub fn request_into(&mut self, key: ExpertKey, offset: u64, len: usize, arena: HostWriter, at: usize, room: usize) {
        let tx = self.tx.as_ref().expect("the I/O thread runs until the prefetcher drops");
        if tx.send(Request { key, offset, len, into: Some((arena, at, room)) }).is_ok() {
            self.in_flight.insert(key);
            self.slot_reads.insert(key);
            self.stats.issued += 1;
            self.stats.into_arena += 1;
        } else {
            // The I/O thread is gone (it stops only when dropped): the slot stays unfilled.
            self.slot_failed.push((key, io_thread_stopped()));
        }
    }

    /// Wait until every read `request_into` started is done. Returns the keys whose read
    /// failed, with why: their slots hold no expert.
    pub fn finish_slot_reads(&mut self) -> Vec<(ExpertKey, Error)> {
        while !self.slot_reads.is_empty() {
            let Ok((k, r)) = self.rx.recv() else { break };
            self.in_flight.remove(&k);
            self.absorb(k, r);
        }
        // Reads the thread never answered (it stopped) failed too.
        for k in std::mem::take(&mut self.slot_reads) {
            self.in_flight.remove(&k);
            self.slot_failed.push((k, io_thread_stopped()));
        }
        std::mem::take(&mut self.slot_failed)
    }

    /// File a finished read: a slot read is done (or failed); a record waits to be taken.
    fn absorb(&mut self, k: ExpertKey, r: Result<Record>) {
        if self.slot_reads.remove(&k) {
            if let Err(e) = r {
                self.slot_failed.push((k, e));
            }
        } else {
            self.ready.insert(k, r);
        }
    }

    /// The bytes of `key` if they were prefetched, waiting for a read still in flight; None if
    /// nobody asked for them.
    pub fn take(&mut self, key: ExpertKey) -> Option<Result<Record>> {
        if let Some(r) = self.ready.remove(&key) {
            self.count_use(key);
            return Some(r);
        }
        if !self.in_flight.contains(&key) {
            return None;
        }
        while let Ok((k, r)) = self.rx.recv() {
            self.in_flight.remove(&k);
            if k == key {
                self.count_use(key);
                return Some(r);
            }
            self.absorb(k, r);
        }
        None
    }

    fn count_use(&mut self, key: ExpertKey) {
        if self.predicted.remove(&key) {
            self.stats.used += 1;
        }
    }

    /// Drop what was prefetched for layers other than `layer` and `layer + 1`
    /// (mispredictions), so at most two layers' predictions are held.
    pub fn retire_all_but(&mut self, layer: u32) {
        while let Ok((k, r)) = self.rx.try_recv() {
            self.in_flight.remove(&k);
            self.absorb(k, r);
        }
        let keep = |k: &ExpertKey| k.0 == layer || k.0 == layer + 1;
        let before = self.ready.len();
        self.ready.retain(|k, _| keep(k));
        self.stats.wasted += (before - self.ready.len()) as u64;
        let ready = &self.ready;
        let in_flight = &self.in_flight;
        self.predicted.retain(|k| keep(k) || in_flight.contains(k) || ready.contains_key(k));
    }

    /// Bytes held in prefetched records.
    pub fn held_bytes(&self) -> usize {
        self.ready.values().map(|r| r.as_ref().map_or(0, |b| b.capacity())).sum()
    }

    /// Give a buffer back for the I/O thread to read into again (saves allocating and
    /// faulting in a record's worth of memory per read).
    pub fn recycle(&self, rec: Record) {
        if rec.capacity() > 0 {
            let _ = self.spare.send(rec);
        }
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
