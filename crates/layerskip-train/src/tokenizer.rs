//! Training a byte-level BPE tokenizer on a corpus, for models trained from scratch.

use layerskip_model::Tokenizer;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder};

use crate::data::Document;
use crate::error::{Result, TrainError};

/// The end-of-text token every trained tokenizer gets (id 0).
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Trains a GPT-2 style byte-level BPE with `vocab_size` tokens (the 256 byte symbols and
/// `<|endoftext|>` included) on the documents (prompts and texts).
pub fn train_bpe(docs: &[Document], vocab_size: usize) -> Result<Tokenizer> {
    if vocab_size < 258 {
        return Err(TrainError::Config(format!(
            "tokenizer vocab_size {vocab_size} must be >= 258"
        )));
    }
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(byte_level.into()))
    .with_decoder(Some(byte_level.into()))
    .build()
    .map_err(|e| TrainError::Data(format!("tokenizer: {e}")))?;
    let texts = docs
        .iter()
        .flat_map(|d| d.prompt.iter().chain(std::iter::once(&d.text)));
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|e| TrainError::Data(format!("training the tokenizer: {e}")))?;
    Ok(Tokenizer::from_inner(tokenizer.into()))
}
