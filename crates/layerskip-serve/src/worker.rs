//! The engine threads: each owns a view of the model (weights shared, not copied) and its own KV
//! caches, and they take queued jobs in arrival order (one FIFO queue). With a batch size above
//! one, an engine decodes up to that many autoregressive jobs together, one pass through the
//! model per step for all of them ([`Batch`]); jobs join and leave between steps. A greedy
//! self-speculative job runs alone when the engine has nothing else to do, else joins the batch
//! as autoregressive decoding, which gives exactly its tokens ([`Batch::exact_batched`]), so it
//! does not wait. A job that does not batch (early exit, sampled self-speculation, or one that
//! asked for its tokens' provenance) waits until the engine's batch has drained and then runs
//! alone, so jobs start in arrival order. Each job streams its text back over a
//! channel; a job whose client has gone (the receiver dropped) is skipped if still queued and
//! cancelled at its next token if running, so a disconnect frees its place at once.

use std::collections::HashMap;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use layerskip_infer::{
    Batch, GenerateOptions, Generation, GenerationStats, Generator, InferError, StopReason,
    Strategy, StreamEvent, TextStream,
};
use layerskip_model::{LayerSkipBackend, LlamaModel, Tokenizer};
use serde::Serialize;
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
    /// Whether its text events say how each token was made ([`TokenSource`]).
    pub provenance: bool,
    /// The text of the prompt token that token healing took back (empty: none); the generated
    /// text begins with it and the job streams what follows
    /// ([`TextStream::healed`](layerskip_infer::TextStream::healed)).
    pub healed: String,
}

/// How one generated token was made, for clients that ask (`layerskip.provenance`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenSource {
    /// The token's text, decoded alone.
    pub text: String,
    /// `"draft"`: drafted at `exit_layer` and accepted by the verifier; `"correction"`: the
    /// verifier's token where it rejected a draft (`rejected` holds the rejected drafts'
    /// text); `"bonus"`: the verifier's token after it accepted every draft; `"ar"`: the full
    /// model's own (autoregressive decoding, and the prompt's first token under
    /// self-speculation); `"early-exit"`: the exit's own (early exit at `exit_layer`).
    pub source: &'static str,
    /// The exit layer of a draft or an early exit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_layer: Option<usize>,
    /// A correction's rejected drafts, as text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
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
    /// Text the accepted tokens added (held back where a character is split between tokens
    /// or a stop string may begin), and how those tokens were made when the job asked
    /// (`provenance`; empty otherwise).
    Text {
        /// The text released.
        text: String,
        /// The step's tokens, as they were generated.
        tokens: Vec<TokenSource>,
    },
    /// The generation ended.
    Done {
        /// Why.
        finish: Finish,
        /// Its statistics.
        stats: GenerationStats,
        /// The strategy it ran: autoregressive for a greedy self-speculative job that was
        /// batched.
        strategy: Strategy,
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

/// The jobs of one engine's queue: one FIFO queue shared by the engines.
type Queue = Arc<Mutex<mpsc::Receiver<Job>>>;

/// The next job: waits for one when `wait`, else only takes one that is queued. `None` when no
/// job is there (or, waiting, when every handle has been dropped).
fn next_job(queue: &Queue, wait: bool) -> Option<Job> {
    // The lock is held only while taking (or waiting for) the next job, so jobs start in
    // arrival order on whichever engine is free. An engine with a batch running does not wait
    // for the lock: while another engine holds it waiting, any new job goes to that one.
    if wait {
        queue.lock().ok()?.recv().ok()
    } else {
        queue.try_lock().ok()?.try_recv().ok()
    }
}

/// Starts `engines` engine threads on `model`, each decoding up to `batch` autoregressive jobs
/// together (1: one job at a time) with KV caches of `capacity` positions (and an untimed
/// `warm_up` generation), and returns the handle that queues jobs for them. The threads end
/// when every handle is dropped.
pub fn spawn<B: LayerSkipBackend>(
    model: LlamaModel<B>,
    tokenizer: Arc<Tokenizer>,
    capacity: usize,
    (engines, batch): (usize, usize),
    warm_up: Option<GenerateOptions>,
    metrics: Arc<Metrics>,
) -> Result<EngineHandle, InferError> {
    if engines == 0 || batch == 0 {
        return Err(InferError::InvalidArgument(
            "at least one engine and a batch of at least one are needed".into(),
        ));
    }
    let layers = model.num_layers();
    let (jobs, queue) = mpsc::channel::<Job>();
    let queue: Queue = Arc::new(Mutex::new(queue));
    let (ready_tx, ready_rx) = mpsc::channel();
    for i in 0..engines {
        // Module clones share their tensors (and the CPU's packed weights).
        let model = model.clone();
        let (tokenizer, metrics, queue) = (tokenizer.clone(), metrics.clone(), queue.clone());
        let (ready_tx, warm_up) = (ready_tx.clone(), warm_up.clone());
        std::thread::Builder::new()
            .name(format!("layerskip-engine-{i}"))
            .spawn(move || {
                let engine = Engine::new(&model, capacity, batch, warm_up.as_ref());
                let mut engine = match engine {
                    Ok(engine) => engine,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                drop(ready_tx);
                engine.serve(&queue, &tokenizer, &metrics);
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

/// A running job's streaming state.
struct Streaming<'t> {
    job: Job,
    tokenizer: &'t Tokenizer,
    text: TextStream<'t>,
    /// The client has gone.
    gone: bool,
    /// The current self-speculative step: its exit and accepted drafts, and the text of the
    /// drafts the verifier rejected.
    step: Option<(usize, usize)>,
    rejected: Option<String>,
    /// The healed text still to take off the first token's provenance text.
    healed: Option<String>,
}

impl<'t> Streaming<'t> {
    fn new(job: Job, tokenizer: &'t Tokenizer) -> Self {
        let text = TextStream::healed(tokenizer, job.stops.clone(), &job.healed);
        let healed = Some(job.healed.clone()).filter(|h| !h.is_empty());
        Self {
            job,
            tokenizer,
            text,
            gone: false,
            step: None,
            rejected: None,
            healed,
        }
    }

    /// Streams a generation event; `false` when the generation should end (its client has
    /// gone, or a stop string ended the text).
    fn on_event(&mut self, event: StreamEvent<'_>) -> bool {
        let tokens = match event {
            StreamEvent::Accepted(tokens) => tokens,
            StreamEvent::Drafted {
                exit_layer,
                accepted,
            } => {
                self.step = Some((exit_layer, accepted));
                return true;
            }
            StreamEvent::Rejected(drafts) if self.job.provenance => {
                self.rejected = Some(self.tokenizer.decode(drafts).unwrap_or_default());
                return true;
            }
            _ => return true,
        };
        let sources = self.sources(tokens);
        let text = self.text.push(tokens);
        if self.job.events.is_closed()
            || ((!text.is_empty() || !sources.is_empty())
                && self
                    .job
                    .events
                    .send(Event::Text {
                        text,
                        tokens: sources,
                    })
                    .is_err())
        {
            self.gone = true;
            return false;
        }
        !self.text.stopped()
    }

    /// How `tokens` were made (nothing unless the job asked): after a self-speculative step's
    /// `Drafted`, its accepted drafts and the verifier's token; else the model's own.
    fn sources(&mut self, tokens: &[u32]) -> Vec<TokenSource> {
        let step = self.step.take();
        let mut rejected = self.rejected.take();
        let mut healed = self.healed.take();
        if !self.job.provenance {
            return Vec::new();
        }
        let own = match self.job.options.strategy {
            Strategy::EarlyExit { exit_layer } => ("early-exit", Some(exit_layer)),
            _ => ("ar", None),
        };
        tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                let (source, exit_layer, rejected) = match step {
                    Some((e, accepted)) if i < accepted => ("draft", Some(e), None),
                    Some(_) if rejected.is_some() => ("correction", None, rejected.take()),
                    Some(_) => ("bonus", None, None),
                    None => (own.0, own.1, None),
                };
                let mut text = self.tokenizer.decode(&[t]).unwrap_or_default();
                if let Some(healed) = healed.take() {
                    // The first token begins with the prompt's healed text, which the client
                    // has: its provenance shows the rest, as the text does.
                    text = text
                        .strip_prefix(healed.as_str())
                        .unwrap_or(&text)
                        .to_string();
                }
                TokenSource {
                    text,
                    source,
                    exit_layer,
                    rejected,
                }
            })
            .collect()
    }

    /// Reports how the generation ended (an error as its message).
    fn finish(mut self, result: Result<Generation, String>, metrics: &Metrics) {
        let events = &self.job.events;
        match result {
            Ok(_) if self.gone => metrics.cancelled(),
            Ok(generation) => {
                let rest = self.text.finish();
                if !rest.is_empty() {
                    let _ = events.send(Event::Text {
                        text: rest,
                        tokens: Vec::new(),
                    });
                }
                let finish = match generation.stop {
                    StopReason::StopToken | StopReason::Callback => Finish::Stop,
                    StopReason::MaxNewTokens | StopReason::ContextFull => Finish::Length,
                };
                metrics.finished(&generation.stats);
                let _ = events.send(Event::Done {
                    finish,
                    stats: generation.stats,
                    strategy: self.job.options.strategy,
                });
            }
            Err(e) => {
                let _ = events.send(Event::Failed(e));
            }
        }
    }
}

/// Announces a job if it is valid and its client still there; `false` if it ends here.
fn start(job: &Job, valid: Result<(), InferError>, metrics: &Metrics) -> bool {
    if job.events.is_closed() {
        metrics.cancelled();
        return false;
    }
    if let Err(e) = valid {
        metrics.rejected();
        let _ = job.events.send(Event::Rejected(e));
        return false;
    }
    if job.events.send(Event::Started).is_err() {
        metrics.cancelled();
        return false;
    }
    metrics.queue_wait(job.queued.elapsed().as_secs_f64());
    true
}

/// One engine: a generator for jobs that run alone and, with a batch size above one, a batch.
struct Engine<'m, B: LayerSkipBackend> {
    generator: Generator<'m, B>,
    batch: Option<Batch<'m, B>>,
}

impl<'m, B: LayerSkipBackend> Engine<'m, B> {
    fn new(
        model: &'m LlamaModel<B>,
        capacity: usize,
        batch: usize,
        warm_up: Option<&GenerateOptions>,
    ) -> Result<Self, InferError> {
        let mut generator = Generator::new(model, capacity)?;
        if let Some(options) = warm_up {
            generator.warm_up(options)?;
        }
        let batch = match batch {
            1 => None,
            n => Some(Batch::new(model, capacity, n)?),
        };
        Ok(Self { generator, batch })
    }

    /// Takes and runs jobs until every handle has been dropped.
    fn serve(&mut self, queue: &Queue, tokenizer: &Tokenizer, metrics: &Metrics) {
        let Some(batch) = self.batch.as_mut() else {
            while let Some(job) = next_job(queue, true) {
                metrics.dequeued();
                run(&mut self.generator, tokenizer, job, metrics);
            }
            return;
        };
        let mut running: HashMap<usize, Streaming<'_>> = HashMap::new();
        // A job that does not batch, waiting for the batch to drain.
        let mut held: Option<Job> = None;
        // A job taken from the queue to see whether another waits, not yet placed.
        let mut next: Option<Job> = None;
        loop {
            while held.is_none() && !batch.is_full() {
                let job = match next.take() {
                    Some(job) => job,
                    None => {
                        let Some(job) = next_job(queue, batch.is_empty()) else {
                            if batch.is_empty() {
                                return;
                            }
                            break;
                        };
                        metrics.dequeued();
                        job
                    }
                };
                // A request invalid as asked is refused as asked, before any batching.
                if let Err(e) = self.generator.validate(&job.prompt, &job.options) {
                    start(&job, Err(e), metrics);
                    continue;
                }
                let idle = batch.is_empty();
                let (job, joins) = batched::<B>(job, idle, queue, &mut next, metrics);
                if !joins {
                    held = Some(job);
                    break;
                }
                if !start(&job, batch.validate(&job.prompt, &job.options), metrics) {
                    continue;
                }
                let mut streaming = Streaming::new(job, tokenizer);
                let (prompt, options) =
                    (streaming.job.prompt.clone(), streaming.job.options.clone());
                match batch.admit(&prompt, &options, |event| streaming.on_event(event)) {
                    Ok(slot) => {
                        running.insert(slot, streaming);
                    }
                    Err(e) => streaming.finish(Err(e.to_string()), metrics),
                }
                finish_batched(batch, &mut running, metrics);
            }
            if batch.is_empty() {
                if let Some(job) = held.take() {
                    run(&mut self.generator, tokenizer, job, metrics);
                }
                continue;
            }
            metrics.batch_step(batch.len());
            let stepped = batch.step(|slot, event| {
                running
                    .get_mut(&slot)
                    .is_none_or(|streaming| streaming.on_event(event))
            });
            if let Err(e) = stepped {
                for (_, streaming) in running.drain() {
                    streaming.finish(Err(e.to_string()), metrics);
                }
                continue;
            }
            finish_batched(batch, &mut running, metrics);
        }
    }
}

/// `job` as it is to run, and whether it joins the batch (else it runs alone): a job that
/// batches joins as it is; a greedy self-speculative one (that did not ask for provenance) joins
/// as its autoregressive twin, unless the engine is `idle` (its batch empty) and no other job
/// waits, which is seen by taking the next queued job, if any, into `next`.
fn batched<B: LayerSkipBackend>(
    mut job: Job,
    idle: bool,
    queue: &Queue,
    next: &mut Option<Job>,
    metrics: &Metrics,
) -> (Job, bool) {
    if Batch::<B>::batches(&job.options) {
        return (job, true);
    }
    let twin = match job.provenance {
        true => None,
        false => Batch::<B>::exact_batched(&job.options),
    };
    let Some(twin) = twin else {
        return (job, false);
    };
    if idle && next.is_none() {
        *next = next_job(queue, false);
        if next.is_some() {
            metrics.dequeued();
        }
    }
    if idle && next.is_none() {
        return (job, false);
    }
    job.options = twin;
    (job, true)
}

/// Reports the batch's finished jobs.
fn finish_batched<B: LayerSkipBackend>(
    batch: &mut Batch<'_, B>,
    running: &mut HashMap<usize, Streaming<'_>>,
    metrics: &Metrics,
) {
    for (slot, generation) in batch.take_finished() {
        if let Some(streaming) = running.remove(&slot) {
            streaming.finish(Ok(generation), metrics);
        }
    }
}

fn run<B: LayerSkipBackend>(
    generator: &mut Generator<'_, B>,
    tokenizer: &Tokenizer,
    job: Job,
    metrics: &Metrics,
) {
    if !start(&job, generator.validate(&job.prompt, &job.options), metrics) {
        return;
    }
    let (prompt, options) = (job.prompt.clone(), job.options.clone());
    let mut streaming = Streaming::new(job, tokenizer);
    let result = generator.generate(&prompt, &options, |event| streaming.on_event(event));
    streaming.finish(result.map_err(|e| e.to_string()), metrics);
}
