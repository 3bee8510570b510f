//! The README's embedding example: load a checkpoint directory, generate with self-speculation.
//!
//! `cargo run --release -p layerskip-infer --example generate [-- MODEL_DIR]` (default: the
//! repository's `models/default`).

use std::path::PathBuf;

use burn::backend::Flex;
use layerskip_infer::{GenerateOptions, Generator, Strategy};
use layerskip_model::{LlamaModel, Tokenizer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/default"),
        PathBuf::from,
    );
    let model = LlamaModel::<Flex>::from_pretrained(&dir, &Default::default())?;
    let tokenizer = Tokenizer::from_file(&dir)?;
    let mut generator = Generator::new(&model, 1024)?;
    let strategy = Strategy::SelfSpeculative {
        exit_layer: 5,
        speculations: 3,
    };
    let prompt = tokenizer.encode("def parse_args(argv):")?;
    let options = GenerateOptions::new(strategy).with_max_new_tokens(64);
    let out = generator.generate(&prompt, &options, |_| true)?;
    println!("{}", tokenizer.decode(&out.tokens)?);
    Ok(())
}
