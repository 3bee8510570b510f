//! Training across processes, one per node, on Burn's distributed engine (burn-collective).
//!
//! Every node holds the whole model and computes the gradient of its shard of each step's
//! batch; one `burn_collective::all_reduce` of them, flattened into one tensor, sums the shards'
//! gradients between the nodes, and every node applies the same optimizer step to the same sum,
//! so the replicas stay identical without ever sending weights. Rank 0 hosts burn-collective's orchestrator (which introduces the nodes
//! to each other) at the coordinator address; the tensors themselves travel between the nodes'
//! data services over WebSocket (burn-collective's ring all-reduce), which works for any backend,
//! Flex included.
//!
//! burn-collective waits without a deadline and reports a vanished peer by a panic in one of its
//! tasks, so every call here runs against [`ClusterConfig::timeout`]; when it passes (or the
//! engine fails) the error names the nodes whose data service no longer answers.

use std::fmt::Display;
use std::marker::PhantomData;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, FloatDType, Tensor, TensorData, TensorPrimitive};
use burn_collective::{CollectiveConfig, CollectiveError, PeerId, ReduceOperation};
use layerskip_model::LlamaModel;

use crate::error::{Result, TrainError};

mod params;

pub use params::{Fingerprint, gradient_presence, number_params};

/// Longest node address (`host:port`) the start-up exchange carries.
const MAX_ADDRESS: usize = 120;
/// Bytes of the run fingerprint the start-up exchange compares.
const FINGERPRINT: usize = 8;

/// Where this process sits in a multi-node run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Number of nodes (processes) in the run.
    pub nodes: usize,
    /// This node's rank, `0..nodes`; rank 0 hosts the coordinator and writes the checkpoints.
    pub rank: usize,
    /// `host:port` of the coordinator (burn-collective's orchestrator, run by rank 0).
    pub coordinator: String,
    /// `host:port` at which the other nodes reach this node's data service; `None` takes the
    /// address of the interface that routes to the coordinator and port `coordinator + 1 + rank`.
    pub address: Option<String>,
    /// How long a node waits for the others (joining, and each step's all-reduce) before it gives
    /// up and names the nodes that do not answer.
    pub timeout: Duration,
}

impl ClusterConfig {
    /// Checks the ranks and addresses before any connection is made.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Cluster(m));
        if self.nodes == 0 {
            return bad("--nodes must be at least 1".into());
        }
        if self.rank >= self.nodes {
            return bad(format!(
                "--node-rank {} is out of range for {} nodes (0..={})",
                self.rank,
                self.nodes,
                self.nodes - 1
            ));
        }
        if self.timeout.is_zero() {
            return bad("the collective timeout must be positive".into());
        }
        socket_address(&self.coordinator, "--coordinator")?;
        if let Some(a) = &self.address {
            socket_address(a, "--node-address")?;
            if a.len() > MAX_ADDRESS {
                return bad(format!("--node-address is longer than {MAX_ADDRESS} bytes"));
            }
        }
        Ok(())
    }

    /// This node's data-service address: the one given, or the interface towards the
    /// coordinator with port `coordinator + 1 + rank`.
    fn node_address(&self) -> Result<String> {
        if let Some(a) = &self.address {
            return Ok(a.clone());
        }
        let coordinator = socket_address(&self.coordinator, "--coordinator")?;
        let port = usize::from(coordinator.port()) + 1 + self.rank;
        let port = u16::try_from(port).map_err(|_| {
            TrainError::Cluster(format!(
                "no default data port for rank {}: coordinator port {} + 1 + rank exceeds 65535 \
                 (give --node-address)",
                self.rank,
                coordinator.port()
            ))
        })?;
        // A UDP "connection" sends nothing: it asks the OS which interface routes there.
        let unspecified = if coordinator.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let local = UdpSocket::bind(unspecified)
            .and_then(|s| s.connect(coordinator).and_then(|()| s.local_addr()))
            .map_err(|e| {
                TrainError::Cluster(format!(
                    "cannot find this node's address towards the coordinator {coordinator}: {e} \
                     (give --node-address)"
                ))
            })?;
        Ok(SocketAddr::new(local.ip(), port).to_string())
    }
}

/// Resolves `host:port`.
fn socket_address(text: &str, flag: &str) -> Result<SocketAddr> {
    text.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            TrainError::Cluster(format!(
                "{flag} {text:?} is not a reachable host:port (e.g. 10.0.0.1:29500)"
            ))
        })
}

/// Whether something accepts TCP connections at `address` within two seconds.
fn answers(address: &str) -> bool {
    let Ok(addrs) = address.to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
}

/// A joined multi-node run: this node's place in it and every node's address. `B` is the
/// backend the gradients live on (the autodiff backend's inner one).
pub struct Cluster<B: Backend> {
    config: ClusterConfig,
    /// Data-service address of every rank, exchanged at start.
    addresses: Vec<String>,
    _backend: PhantomData<B>,
}

impl<B: Backend> std::fmt::Debug for Cluster<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("config", &self.config)
            .field("addresses", &self.addresses)
            .finish()
    }
}

impl<B: Backend> Cluster<B> {
    /// Joins the run: rank 0 starts the coordinator; every node registers with it, then the
    /// nodes exchange their addresses and the fingerprint of their run (config, data, starting
    /// weights and step), and all refuse to start if any node's differs from rank 0's.
    pub fn join(config: ClusterConfig, device: &B::Device, fingerprint: u64) -> Result<Self> {
        config.validate()?;
        let address = config.node_address()?;
        let data_port = socket_address(&address, "--node-address")?.port();
        if config.rank == 0 {
            start_coordinator(&config.coordinator)?;
        }
        let collective = CollectiveConfig::default()
            .with_num_devices(1)
            .with_num_nodes(config.nodes as u32)
            .with_global_address(ws(&config.coordinator))
            .with_node_address(ws(&address))
            .with_data_service_port(data_port);
        let mut cluster = Self {
            addresses: vec![String::new(); config.nodes],
            config,
            _backend: PhantomData,
        };
        let (peer, dev) = (cluster.peer(), device.clone());
        cluster.call(
            format_args!(
                "joining {} nodes through the coordinator at {}",
                cluster.config.nodes, cluster.config.coordinator
            ),
            move || burn_collective::register::<B>(peer, dev, collective),
        )?;
        cluster.exchange(&address, fingerprint, device)?;
        Ok(cluster)
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.config.nodes
    }

    /// This node's rank.
    pub fn rank(&self) -> usize {
        self.config.rank
    }

    /// Every rank's data-service address.
    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    fn peer(&self) -> PeerId {
        PeerId(self.config.rank as u32)
    }

    /// Each node fills its own row of a `[nodes, 1 + MAX_ADDRESS + FINGERPRINT]` table with bytes
    /// (address length, address, fingerprint) and zeros elsewhere; a summing all-reduce is then
    /// an exact gather (byte values plus zeros), the only collective besides all-reduce that
    /// burn-collective offers between nodes.
    fn exchange(&mut self, address: &str, fingerprint: u64, device: &B::Device) -> Result<()> {
        let (n, width) = (self.config.nodes, 1 + MAX_ADDRESS + FINGERPRINT);
        let mut table = vec![0f32; n * width];
        let row = &mut table[self.config.rank * width..][..width];
        row[0] = address.len() as f32;
        for (cell, byte) in row[1..].iter_mut().zip(address.bytes()) {
            *cell = f32::from(byte);
        }
        for (cell, byte) in row[1 + MAX_ADDRESS..]
            .iter_mut()
            .zip(fingerprint.to_le_bytes())
        {
            *cell = f32::from(byte);
        }
        let table = self.all_reduce_floats(table, [n, width], device, "exchanging addresses")?;
        let mut prints = Vec::with_capacity(n);
        for (rank, row) in table.chunks_exact(width).enumerate() {
            let len = row[0] as usize;
            // Cells that hold whole numbers 0..=255, as bytes (`None` if any does not).
            let bytes = |cells: &[f32]| -> Option<Vec<u8>> {
                cells
                    .iter()
                    .map(|&v| (v.fract() == 0.0 && (0.0..=255.0).contains(&v)).then_some(v as u8))
                    .collect()
            };
            let address =
                bytes(&row[1..=len.min(MAX_ADDRESS)]).and_then(|b| String::from_utf8(b).ok());
            let print = bytes(&row[1 + MAX_ADDRESS..]);
            match (len, address, print) {
                (1..=MAX_ADDRESS, Some(a), Some(p)) => {
                    self.addresses[rank] = a;
                    prints.push(p);
                }
                _ => {
                    return Err(TrainError::Cluster(format!(
                        "no node has rank {rank}, so two nodes share one: give every node its \
                         own --node-rank in 0..{n}"
                    )));
                }
            }
        }
        let differ: Vec<String> = (1..n)
            .filter(|&r| prints[r] != prints[0])
            .map(|r| format!("node {r} ({})", self.addresses[r]))
            .collect();
        if !differ.is_empty() {
            return Err(TrainError::Cluster(format!(
                "{} would train another run than node 0: the config, the data, the starting \
                 checkpoint or its step differ (every node must start from the same ones)",
                differ.join(", ")
            )));
        }
        Ok(())
    }

    /// Sums `grads` (this node's shard of the step) over the nodes as one flat tensor: the
    /// gradient of every parameter flagged in `needed` (some node has one; see
    /// [`gradient_presence`]), zeros where this node has none, in `model`'s visiting order,
    /// flattened and concatenated, so every node sends the same layout; one all-reduce; cut back
    /// into shape. Parameters no node has a gradient for stay without one, as in single-process
    /// training (AdamW then leaves them and their moments alone). burn-collective's per-tensor
    /// `GradientsParams::all_reduce` pays a ring pass and a sync (a fresh connection to every
    /// peer) per tensor.
    pub fn all_reduce_grads<A: AutodiffBackend<InnerBackend = B>>(
        &self,
        model: &LlamaModel<A>,
        mut grads: GradientsParams,
        needed: &[bool],
        step: usize,
    ) -> Result<GradientsParams> {
        struct Flatten<'a, B: Backend> {
            grads: &'a mut GradientsParams,
            needed: std::slice::Iter<'a, bool>,
            parts: Vec<Tensor<B, 1>>,
            /// Each gradient taken out: its parameter, dims and dtype, in order.
            taken: Vec<(ParamId, Vec<usize>, DType)>,
        }
        impl<A: AutodiffBackend> ModuleVisitor<A> for Flatten<'_, A::InnerBackend> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
                if !self.needed.next().copied().unwrap_or(false) {
                    return;
                }
                let grad = self
                    .grads
                    .remove::<A::InnerBackend, D>(param.id)
                    .unwrap_or_else(|| {
                        let device = param.val().device();
                        Tensor::zeros(param.shape(), &device)
                    });
                self.taken
                    .push((param.id, grad.dims().to_vec(), grad.dtype()));
                let n = grad.shape().num_elements();
                self.parts.push(grad.cast(FloatDType::F32).reshape([n]));
            }
        }
        struct Unflatten<'a, B: Backend> {
            grads: &'a mut GradientsParams,
            flat: Tensor<B, 1>,
            taken: std::vec::IntoIter<(ParamId, Vec<usize>, DType)>,
            next: Option<(ParamId, Vec<usize>, DType)>,
            offset: usize,
        }
        impl<A: AutodiffBackend> ModuleVisitor<A> for Unflatten<'_, A::InnerBackend> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
                if self.next.as_ref().is_some_and(|(id, _, _)| *id == param.id) {
                    let (id, dims, dtype) = self.next.take().expect("checked");
                    let n: usize = dims.iter().product();
                    let dims: [usize; D] =
                        dims.try_into().expect("a gradient has its param's rank");
                    let part = self.flat.clone().slice(self.offset..self.offset + n);
                    self.grads.register(id, part.reshape(dims).cast(dtype));
                    self.offset += n;
                    self.next = self.taken.next();
                }
            }
        }
        let mut flatten = Flatten {
            grads: &mut grads,
            needed: needed.iter(),
            parts: Vec::new(),
            taken: Vec::new(),
        };
        model.visit(&mut flatten);
        let Flatten { parts, taken, .. } = flatten;
        if parts.is_empty() {
            return Ok(grads);
        }
        let flat = Tensor::cat(parts, 0).into_primitive().tensor();
        let peer = self.peer();
        let summed = self.call(
            format_args!("summing the gradients of step {step}"),
            move || burn_collective::all_reduce::<B>(peer, flat, ReduceOperation::Sum),
        )?;
        let mut taken = taken.into_iter();
        let next = taken.next();
        model.visit(&mut Unflatten {
            grads: &mut grads,
            flat: Tensor::from_primitive(TensorPrimitive::Float(summed)),
            taken,
            next,
            offset: 0,
        });
        Ok(grads)
    }

    /// Sums `values` over the nodes (at f32 precision).
    pub fn all_reduce_values(
        &self,
        values: &[f64],
        device: &B::Device,
        what: &str,
    ) -> Result<Vec<f64>> {
        // The ring splits a tensor into one slice per node: pad to at least `nodes` values.
        let len = values.len().max(self.config.nodes);
        let mut padded: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        padded.resize(len, 0.0);
        let summed = self.all_reduce_floats(padded, [len], device, what)?;
        Ok(summed[..values.len()]
            .iter()
            .map(|&v| f64::from(v))
            .collect())
    }

    fn all_reduce_floats<const D: usize>(
        &self,
        values: Vec<f32>,
        shape: [usize; D],
        device: &B::Device,
        what: &str,
    ) -> Result<Vec<f32>> {
        let tensor = Tensor::<B, D>::from_data(TensorData::new(values, shape), device);
        let primitive = tensor.into_primitive().tensor();
        let peer = self.peer();
        let summed = self.call(format_args!("{what}"), move || {
            burn_collective::all_reduce::<B>(peer, primitive, ReduceOperation::Sum)
        })?;
        let tensor = Tensor::<B, D>::from_primitive(TensorPrimitive::Float(summed));
        tensor
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| TrainError::Cluster(format!("{what}: {e:?}")))
    }

    /// Waits until every node reaches this point (after the last step, once rank 0 has written
    /// the final checkpoint), so no node exits while another still needs its data service.
    /// burn-collective's own `finish_collective` is not used: it closes the connection to the
    /// coordinator, which rank 0 hosts and takes down when it exits, so whichever node finished
    /// second failed.
    pub fn barrier(&self, device: &B::Device, what: &str) -> Result<()> {
        let arrived = self.all_reduce_values(&[1.0], device, what)?;
        if arrived[0] as usize != self.config.nodes {
            return Err(TrainError::Cluster(format!(
                "{what}: {} of {} nodes arrived",
                arrived[0], self.config.nodes
            )));
        }
        Ok(())
    }

    /// Runs a blocking collective call against the timeout.
    fn call<T: Send + 'static>(
        &self,
        what: impl Display,
        f: impl FnOnce() -> std::result::Result<T, CollectiveError> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // A send fails only if the caller gave up already.
            let _ = tx.send(f());
        });
        let timeout = self.config.timeout;
        let failure = match rx.recv_timeout(timeout) {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => format!("burn-collective failed ({e:?})"),
            Err(RecvTimeoutError::Timeout) => format!("no answer within {} s", timeout.as_secs()),
            Err(RecvTimeoutError::Disconnected) => "burn-collective stopped".to_string(),
        };
        Err(TrainError::Cluster(format!(
            "node {}: {what}: {failure}; {}",
            self.config.rank,
            self.diagnose()
        )))
    }

    /// Which nodes (and the coordinator) no longer accept connections. A node that has just
    /// died may answer for a moment while its sockets close, so "every node answers" is only
    /// concluded after a second of asking again.
    fn diagnose(&self) -> String {
        let mut silent = Vec::new();
        for attempt in 0..10 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(100));
            }
            silent = self
                .addresses
                .iter()
                .enumerate()
                .filter(|(rank, a)| *rank != self.config.rank && !a.is_empty() && !answers(a))
                .map(|(rank, a)| format!("node {rank} ({a})"))
                .collect();
            if !answers(&self.config.coordinator) {
                silent.push(format!("the coordinator ({})", self.config.coordinator));
            }
            if !silent.is_empty() {
                break;
            }
        }
        match (
            silent.is_empty(),
            self.addresses.iter().all(String::is_empty),
        ) {
            (false, _) => format!("not answering: {}", silent.join(", ")),
            (true, true) => format!(
                "the coordinator answers but not all {} nodes joined (is every node started with \
                 the same --nodes and its own --node-rank?)",
                self.config.nodes
            ),
            (true, false) => "every node still answers: one may be stalled, or slower than the \
                              timeout (raise --collective-timeout)"
                .to_string(),
        }
    }
}

fn ws(host_port: &str) -> burn_communication::Address {
    format!("ws://{host_port}")
        .parse()
        .expect("an Address parses from any string")
}

/// Starts burn-collective's orchestrator on the coordinator's port, in a thread of its own.
fn start_coordinator(coordinator: &str) -> Result<()> {
    let port = socket_address(coordinator, "--coordinator")?.port();
    // The orchestrator binds 0.0.0.0:port and only logs a failure: bind first to report it.
    std::net::TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
        TrainError::Cluster(format!(
            "rank 0 cannot host the coordinator on port {port}: {e}"
        ))
    })?;
    std::thread::Builder::new()
        .name("coordinator".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a Tokio runtime for the coordinator");
            // The orchestrator returns on SIGINT or SIGTERM, whose handlers it installed
            // (which replaced the default: ending the process); end it as the default would.
            runtime.block_on(burn_collective::start_global_orchestrator(port));
            eprintln!("node 0: interrupted");
            std::process::exit(130);
        })
        .map_err(|e| TrainError::Cluster(format!("cannot start the coordinator: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_checked_before_connecting() {
        let c = ClusterConfig {
            nodes: 2,
            rank: 2,
            coordinator: "127.0.0.1:29500".into(),
            address: None,
            timeout: Duration::from_secs(5),
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("out of range")
        );
        let c = ClusterConfig {
            rank: 1,
            coordinator: "no-port".into(),
            ..c
        };
        assert!(c.validate().unwrap_err().to_string().contains("host:port"));
        let c = ClusterConfig {
            coordinator: "127.0.0.1:29500".into(),
            ..c
        };
        assert_eq!(c.node_address().unwrap(), "127.0.0.1:29502");
    }
}
