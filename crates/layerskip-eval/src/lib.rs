//! # layerskip-eval
//!
//! What measuring LayerSkip generation needs beyond generating, kept out of `layerskip-infer` so
//! that an embedder depends on generation alone:
//!
//! - [`dataset`]: HumanEval (gzipped JSONL), JSONL prompt/reference pairs, continuation prompts cut
//!   from text files, few-shot templates;
//! - [`metrics`]: ROUGE-1/2/L, BLEU-4, exact match, token agreement, the first differing token;
//! - [`bench`](mod@bench): generations over a dataset with a strategy, each prompt's fastest of several runs,
//!   and one [`bench::StrategyReport`] per strategy (speed, acceptance, memory, quality, agreement
//!   with autoregressive decoding).
//!
//! ```
//! use layerskip_eval::metrics::{first_difference, rouge_l};
//!
//! assert_eq!(first_difference(&[1, 2, 3], &[1, 2, 4]), Some(2));
//! assert!((rouge_l("a b c d", "a b c d") - 1.0).abs() < 1e-9);
//! ```

pub mod bench;
pub mod dataset;
pub mod error;
pub mod metrics;

pub use error::{EvalError, Result};
