//! A persistent pool of helper threads for the decode products: the caller runs part 0 of a
//! job and the helpers the others, each helper spinning for a short while after its part so
//! that the next product (a few microseconds later while decoding) finds it awake.
//!
//! Rayon's pool parks idle workers and, called from outside the pool, parks the caller too: a
//! join cost more than one product of the default model. Here a job is handed over through
//! two atomics, and a helper parks only after 300 us without work.
//!
//! One job runs at a time; a caller that finds the pool busy, or whose jobs interleaved with
//! another thread's within the last 2 ms (several decoders at once, as a server's engines), runs
//! every part itself. Parts never change results: the kernels split by output columns, each
//! computed by one thread in a fixed order.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, TryLockError};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// A raw output pointer that several threads write through, each on its own part.
#[derive(Clone, Copy)]
pub(crate) struct Out(pub(crate) *mut f32);
// SAFETY: the kernels that share one write disjoint ranges from each thread.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer (a method, so that closures capture the `Send` wrapper, not the field).
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// How long a helper spins waiting for the next job before it parks.
const SPIN: Duration = Duration::from_micros(300);

/// Most threads a job is split over (the caller included).
const MAX_THREADS: usize = 16;

/// Low bits of [`Shared::generation`] that hold a job's part count.
const PART_BITS: u32 = 5;

/// The job of the current generation: a borrowed closure, valid until every helper has
/// reported its part done.
type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// `(sequence number << PART_BITS) | parts` of the current job, written (release) after
    /// `job`: one word, so that a helper reads the job's part count with its generation.
    generation: AtomicUsize,
    /// Helpers that finished their part of the current job.
    done: AtomicUsize,
    /// Whether a helper's part panicked (the caller panics in turn).
    panicked: AtomicBool,
    job: UnsafeCell<Option<Job>>,
}

// SAFETY: `job` is written only by the one caller holding `Pool::busy`, before the
// generation's release-increment, and read by helpers after their acquire-load of it.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// The helper threads and the lock that admits one job at a time.
pub struct Pool {
    shared: &'static Shared,
    /// The helper threads, to unpark them.
    helpers: Vec<Thread>,
    busy: Mutex<()>,
    threads: usize,
    /// The thread (numbered from 1) that last called [`Pool::run`].
    last_caller: AtomicU64,
    /// Nanoseconds from `epoch` until which callers keep to their own threads.
    contended_until: AtomicU64,
    epoch: Instant,
    /// [`CONTENDED`] (longer in tests).
    window: Duration,
}

/// Numbers the threads that call [`Pool::run`].
static NEXT_CALLER: AtomicU64 = AtomicU64::new(1);

/// How recent another thread's job must be for a caller to keep to its own thread.
const CONTENDED: Duration = Duration::from_millis(2);

impl Pool {
    /// The process's pool: [`CpuOptions::threads`](super::CpuOptions::threads) threads if set
    /// (1 = no helpers), otherwise one per core the process may use, at most 16.
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| {
            let threads = super::options()
                .threads
                .filter(|&n| n >= 1)
                .unwrap_or_else(|| thread::available_parallelism().map_or(1, |n| n.get()))
                .min(MAX_THREADS);
            Pool::new(threads, CONTENDED)
        })
    }

    fn new(threads: usize, window: Duration) -> Pool {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            generation: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            job: UnsafeCell::new(None),
        }));
        let helpers = (1..threads)
            .map(|part| {
                thread::Builder::new()
                    .name(format!("layerskip-helper-{part}"))
                    .spawn(move || helper(shared, part))
                    .expect("spawn a helper thread")
                    .thread()
                    .clone()
            })
            .collect();
        Pool {
            shared,
            helpers,
            busy: Mutex::new(()),
            threads,
            last_caller: AtomicU64::new(0),
            contended_until: AtomicU64::new(0),
            epoch: Instant::now(),
            window,
        }
    }

    /// Whether two threads' jobs interleaved within the last [`CONTENDED`]: several decoders
    /// at once (a server's engines) then each keep to their own thread, since a job split over
    /// threads that other decoders' work occupies waits for them.
    fn contended(&self) -> bool {
        thread_local! {
            static ME: u64 = NEXT_CALLER.fetch_add(1, Ordering::Relaxed);
        }
        let me = ME.with(|id| *id);
        let now = self.epoch.elapsed().as_nanos() as u64;
        let previous = self.last_caller.swap(me, Ordering::Relaxed);
        if previous != me && previous != 0 {
            // Another thread ran jobs: stay on our own threads until it has been quiet for
            // the window (each interleaving extends it).
            let until = now + self.window.as_nanos() as u64;
            self.contended_until.fetch_max(until, Ordering::Relaxed);
        }
        now < self.contended_until.load(Ordering::Relaxed)
    }

    /// Threads a job may use (the caller included).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(0)`, ..., `f(parts - 1)`, part 0 on the calling thread and the others on
    /// helpers, and returns when all are done. With `parts` above [`threads`](Self::threads),
    /// when another thread's job holds the pool, or when another thread ran a job within the
    /// last 2 ms, the caller runs every part itself.
    pub fn run(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        if parts <= 1 || parts > self.threads || self.contended() {
            (0..parts).for_each(f);
            return;
        }
        let _held = match self.busy.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return (0..parts).for_each(f),
        };
        let shared = self.shared;
        shared.done.store(0, Ordering::Relaxed);
        // SAFETY: the lifetime is erased only while this call waits for every helper below,
        // so the closure outlives each use; only this caller (holding `busy`) writes `job`.
        unsafe {
            let job: Job = std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f);
            *shared.job.get() = Some(job);
        }
        let sequence = (shared.generation.load(Ordering::Relaxed) >> PART_BITS) + 1;
        shared
            .generation
            .store(sequence << PART_BITS | parts, Ordering::Release);
        for helper in &self.helpers[..parts - 1] {
            helper.unpark();
        }
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0)));
        while shared.done.load(Ordering::Acquire) < parts - 1 {
            std::hint::spin_loop();
        }
        // SAFETY: every helper is done with the job.
        unsafe { *shared.job.get() = None };
        if let Err(payload) = mine {
            std::panic::resume_unwind(payload);
        }
        if shared.panicked.swap(false, Ordering::Relaxed) {
            panic!("a layerskip helper thread panicked in a kernel");
        }
    }
}

/// Helper `part`'s loop: wait for a new generation (spinning, then parked), run its part if
/// the job has one, report done.
fn helper(shared: &'static Shared, part: usize) {
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        let generation = loop {
            let g = shared.generation.load(Ordering::Acquire);
            if g != seen {
                break g;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && start.elapsed() > SPIN {
                // `unpark` before this park makes it return at once; spurious wake-ups
                // come back to the check above.
                thread::park_timeout(Duration::from_millis(50));
            } else {
                std::hint::spin_loop();
            }
        };
        seen = generation;
        if part < generation & ((1 << PART_BITS) - 1) {
            // SAFETY: written before the generation this thread acquired, and kept alive
            // by the caller until `done` counts this part.
            let job = unsafe { (*shared.job.get()).expect("a job with the generation") };
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*job)(part) }));
            if result.is_err() {
                shared.panicked.store(true, Ordering::Relaxed);
            }
            shared.done.fetch_add(1, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every part runs exactly once per job, over many back-to-back jobs, with the parts'
    /// writes visible to the caller when `run` returns.
    #[test]
    fn every_part_runs_once_per_job() {
        let pool = Pool::new(3, CONTENDED);
        for job in 0..2000usize {
            let parts = 1 + job % 3;
            let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
            pool.run(parts, &|p| {
                hits[p].fetch_add(job + 1, Ordering::Relaxed);
            });
            for (p, h) in hits.iter().enumerate() {
                assert_eq!(h.load(Ordering::Relaxed), job + 1, "job {job} part {p}");
            }
        }
    }

    /// Jobs from several threads at once all complete (a busy pool runs the caller's parts
    /// on the caller).
    #[test]
    fn concurrent_callers_all_complete() {
        let pool = Pool::new(2, CONTENDED);
        let total = AtomicUsize::new(0);
        thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..500 {
                        pool.run(2, &|_| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 500 * 2);
    }

    /// A caller runs its parts on helpers while it is the only one using the pool, on its own
    /// thread once another thread's jobs interleaved with its own, and on helpers again when
    /// the other has been quiet for the window.
    #[test]
    fn a_caller_keeps_to_its_thread_while_another_decodes() {
        let window = Duration::from_millis(50);
        let pool = Pool::new(2, window);
        let threads_of = |pool: &Pool| {
            let ids = Mutex::new(Vec::new());
            pool.run(2, &|_| ids.lock().unwrap().push(thread::current().id()));
            ids.into_inner().unwrap()
        };
        let me = thread::current().id();
        threads_of(&pool);
        assert!(
            threads_of(&pool).iter().any(|id| *id != me),
            "alone: helpers"
        );
        thread::scope(|s| {
            s.spawn(|| threads_of(&pool));
        });
        assert!(
            threads_of(&pool).iter().all(|id| *id == me),
            "another caller: alone"
        );
        assert!(
            threads_of(&pool).iter().all(|id| *id == me),
            "within the window: alone"
        );
        thread::sleep(2 * window);
        assert!(
            threads_of(&pool).iter().any(|id| *id != me),
            "alone again: helpers"
        );
    }

    /// A part that panics on a helper makes the caller panic instead of hanging.
    #[test]
    fn a_panicking_part_reaches_the_caller() {
        let pool = Pool::new(2, CONTENDED);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(2, &|p| assert!(p == 0, "part {p} fails"));
        }));
        assert!(caught.is_err());
        // The pool still works afterwards.
        let n = AtomicUsize::new(0);
        pool.run(2, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 2);
    }
}
