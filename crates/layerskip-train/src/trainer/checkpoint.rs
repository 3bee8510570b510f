//! Checkpoints of a [`Trainer`]: written whole or not at all, never over an earlier one, and
//! resumed bit for bit.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::Optimizer;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use layerskip_model::checkpoint::write_atomic;
use layerskip_model::{LlamaModel, SaveDtype};
use serde::{Deserialize, Serialize};

use super::{EvalReport, Trainer, optimizer};
use crate::config::TrainConfig;
use crate::data::Blocks;
use crate::error::{Result, TrainError};
use crate::run_dir::{DurableMpkRecorder, sync_dir};

/// What a checkpoint directory's `trainer_state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    config: TrainConfig,
    evals: Vec<EvalReport>,
}

impl<B: crate::TrainBackend> Trainer<B> {
    /// Continues the run saved in checkpoint directory `dir` (model, optimizer, step).
    pub fn resume(dir: &Path, train: Blocks, eval: Blocks, device: B::Device) -> Result<Self> {
        let state = read_state(dir)?;
        let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
        let file_err = |path: PathBuf| {
            move |e: burn::record::RecorderError| TrainError::File {
                path,
                message: e.to_string(),
            }
        };
        // The HF files give the architecture; the Burn record restores weights and parameter ids,
        // which the optimizer state is keyed by.
        let skeleton = LlamaModel::<B>::from_pretrained(dir, &device)?;
        let model = skeleton
            .load_file(dir.join("model"), &recorder, &device)
            .map_err(file_err(dir.join("model.mpk")))?;
        let record = recorder
            .load(dir.join("optimizer"), &device)
            .map_err(file_err(dir.join("optimizer.mpk")))?;
        let optim = optimizer::<B>(&state.config).load_record(record);
        let mut trainer = Self::new(state.config, model, train, eval, device)?;
        trainer.optim = optim;
        trainer.step = state.step;
        trainer.evals = state.evals;
        Ok(trainer)
    }

    /// Writes `out_dir/checkpoint-NNNNNN` (HF model files, Burn model and optimizer records,
    /// trainer state, and `extra_files` such as the tokenizer) through a temporary directory and
    /// a rename, and points `out_dir/latest` at it. Every file is synced before the rename and the
    /// directory after it, so a crash leaves the previous checkpoint or this one, whole. Returns
    /// the checkpoint directory.
    ///
    /// A checkpoint of this step that is already there (a resumed run that ends where it
    /// started) is this run's state at this step, so it is kept as it is, never rewritten: there
    /// is no moment without a complete copy. A directory of that name that is not a checkpoint of
    /// this step is refused.
    pub fn save_checkpoint(
        &self,
        out_dir: &Path,
        extra_files: &[(&str, &[u8])],
    ) -> Result<PathBuf> {
        let name = format!("checkpoint-{:06}", self.step);
        let final_dir = out_dir.join(&name);
        let tmp = out_dir.join(format!(".{name}.tmp"));
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |e: std::io::Error| TrainError::File {
                path: p,
                message: e.to_string(),
            }
        };
        if final_dir.exists() {
            match read_state(&final_dir) {
                Ok(state) if state.step == self.step => {
                    write_atomic(&out_dir.join("latest"), name.as_bytes())?;
                    sync_dir(out_dir)?;
                    return Ok(final_dir);
                }
                _ => {
                    return Err(TrainError::File {
                        path: final_dir,
                        message: format!(
                            "exists but is not this run's checkpoint of step {}; move it away",
                            self.step
                        ),
                    });
                }
            }
        }
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        self.model.save_pretrained(&tmp, SaveDtype::F32)?;
        let recorder = DurableMpkRecorder;
        let rec_err = |e: burn::record::RecorderError| TrainError::File {
            path: tmp.clone(),
            message: match e {
                burn::record::RecorderError::Unknown(m) => m,
                other => other.to_string(),
            },
        };
        recorder
            .record(self.model.clone().into_record(), tmp.join("model.mpk"))
            .map_err(rec_err)?;
        recorder
            .record(self.optim.to_record(), tmp.join("optimizer.mpk"))
            .map_err(rec_err)?;
        let state = TrainerState {
            step: self.step,
            config: self.config.clone(),
            evals: self.evals.clone(),
        };
        let json = serde_json::to_string_pretty(&state).expect("serialisable state");
        write_atomic(&tmp.join("trainer_state.json"), json.as_bytes())?;
        for (name, bytes) in extra_files {
            write_atomic(&tmp.join(name), bytes)?;
        }
        sync_dir(&tmp)?;
        std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
        write_atomic(&out_dir.join("latest"), name.as_bytes())?;
        sync_dir(out_dir)?;
        Ok(final_dir)
    }
}

fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::File {
        path: path.clone(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| TrainError::File {
        path,
        message: e.to_string(),
    })
}

/// The configuration the run saved in checkpoint directory `dir` was trained with.
pub fn saved_config(dir: &Path) -> Result<TrainConfig> {
    Ok(read_state(dir)?.config)
}
