//! The engine threads: each owns a view of the model (weights shared, not copied) and its own KV
//! cache, and they take queued jobs in arrival order (one FIFO queue), one job per engine at a
//! time. Each job streams its text back over a channel; a job whose client has gone (the
//! receiver dropped) is skipped if still queued and cancelled at its next accepted token if
//! running, so a disconnect frees its engine at once.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use layerskip_infer::{
    GenerateOptions, GenerationStats, Generator, InferError, StopReason, StreamEvent, TextStream,
};
use layerskip_model::{LayerSkipBackend, LlamaModel, Tokenizer};
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::Metrics;

/// One generation request, ready to run.
pub struct Job {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Strategy, sampling and limits.
    pub options: GenerateOptions,
    /// Stop strings: the text ends before the first one.
    pub stops: Vec<String>,
    /// Where the job's events go.
    pub events: UnboundedSender<Event>,
    /// When the request was queued.
    pub queued: Instant,
}

/// Why a finished generation ended, in OpenAI's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` or the context.
    Length,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What a job reports, in order: `Started` or `Rejected`, then `Text` deltas, then `Done` or
/// `Failed`.
#[derive(Debug)]
pub enum Event {
    /// The request is valid and generation begins.
    Started,
    /// The request is invalid for this model (exit layer out of range, prompt too long, ...).
    Rejected(InferError),
    /// Text the accepted tokens added.
    Text(String),
    /// The generation ended.
    Done {
        /// Why.
        finish: Finish,
        /// Its statistics.
        stats: GenerationStats,
    },
    /// The engine failed while generating.
    Failed(String),
}

/// The queue of the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::Sender<Job>,
    /// Positions of the KV cache: the longest prompt plus generation a request can have.
    pub capacity: usize,
    /// Layers of the model (for request validation messages).
    pub layers: usize,
}

impl EngineHandle {
    /// Queues a job; fails only if the engine thread has ended.
    pub fn submit(&self, job: Job) -> Result<(), String> {
        self.jobs
            .send(job)
            .map_err(|_| "the engine has stopped".to_string())
    }
}

/// Starts `engines` engine threads on `model`, each with a KV cache of `capacity` positions
/// (and an untimed `warm_up` generation), and returns the handle that queues jobs for them. The
/// threads end when every handle is dropped.
pub fn spawn<B: LayerSkipBackend>(
    model: LlamaModel<B>,
    tokenizer: Arc<Tokenizer>,
    capacity: usize,
    engines: usize,
    warm_up: Option<GenerateOptions>,
    metrics: Arc<Metrics>,
) -> Result<EngineHandle, InferError> {
    if engines == 0 {
        return Err(InferError::InvalidArgument(
            "at least one engine is needed".into(),
        ));
    }
    let layers = model.num_layers();
    let (jobs, queue) = mpsc::channel::<Job>();
    let queue = Arc::new(Mutex::new(queue));
    let (ready_tx, ready_rx) = mpsc::channel();
    for i in 0..engines {
        // Module clones share their tensors (and the CPU's packed weights).
        let model = model.clone();
        let (tokenizer, metrics, queue) = (tokenizer.clone(), metrics.clone(), queue.clone());
        let (ready_tx, warm_up) = (ready_tx.clone(), warm_up.clone());
        std::thread::Builder::new()
            .name(format!("layerskip-engine-{i}"))
            .spawn(move || {
                let mut generator = match Generator::new(&model, capacity) {
                    Ok(g) => g,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if let Some(options) = &warm_up
                    && let Err(e) = generator.warm_up(options)
                {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                drop(ready_tx);
                loop {
                    // The lock is held only while waiting for the next job, so jobs start in
                    // arrival order on whichever engine is free.
                    let job = match queue.lock() {
                        Ok(queue) => queue.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else { return };
                    metrics.dequeued();
                    run(&mut generator, &tokenizer, job, &metrics);
                }
            })
            .expect("spawning an engine thread");
    }
    drop(ready_tx);
    for _ in 0..engines {
        ready_rx
            .recv()
            .map_err(|_| InferError::InvalidArgument("an engine thread ended".into()))??;
    }
    Ok(EngineHandle {
        jobs,
        capacity,
        layers,
    })
}

fn run<B: LayerSkipBackend>(
    generator: &mut Generator<'_, B>,
    tokenizer: &Tokenizer,
    job: Job,
    metrics: &Metrics,
) {
    let events = &job.events;
    if events.is_closed() {
        metrics.cancelled();
        return;
    }
    if let Err(e) = generator.validate(&job.prompt, &job.options) {
        metrics.rejected();
        let _ = events.send(Event::Rejected(e));
        return;
    }
    if events.send(Event::Started).is_err() {
        metrics.cancelled();
        return;
    }
    metrics.queue_wait(job.queued.elapsed().as_secs_f64());
    let mut text = TextStream::new(tokenizer, job.stops.clone());
    let mut gone = false;
    let result = generator.generate(&job.prompt, &job.options, |event| {
        let StreamEvent::Accepted(tokens) = event else {
            return true;
        };
        let delta = text.push(tokens);
        if !delta.is_empty() && events.send(Event::Text(delta)).is_err() {
            gone = true;
            return false;
        }
        !text.stopped()
    });
    match result {
        Ok(_) if gone => metrics.cancelled(),
        Ok(generation) => {
            let rest = text.finish();
            if !rest.is_empty() {
                let _ = events.send(Event::Text(rest));
            }
            let finish = match generation.stop {
                StopReason::StopToken | StopReason::Callback => Finish::Stop,
                StopReason::MaxNewTokens | StopReason::ContextFull => Finish::Length,
            };
            metrics.finished(&generation.stats);
            let _ = events.send(Event::Done {
                finish,
                stats: generation.stats,
            });
        }
        Err(e) => {
            let _ = events.send(Event::Failed(e.to_string()));
        }
    }
}
