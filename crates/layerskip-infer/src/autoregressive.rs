//! Autoregressive decoding, and early exit (the same loop through fewer layers): one token per
//! step, the whole prompt as the first step.

use layerskip_model::LayerSkipBackend;

use crate::context::{DecodeContext, Run};
use crate::error::Result;
use crate::options::StreamEvent;

/// Autoregressive decoding through layers `0..exit` (the full model when `exit == L`).
pub(crate) fn decode<B: LayerSkipBackend>(
    ctx: &mut DecodeContext<'_, B>,
    run: &mut Run,
    exit: usize,
    on_event: &mut impl FnMut(StreamEvent<'_>) -> bool,
) -> Result<()> {
    let mut input = run.tokens.clone();
    let mut pos = 0;
    while run.stop.is_none() {
        let h = ctx.layers(ctx.model.embed_ids(&input), 0..exit, pos)?;
        let seq = h.dims()[1];
        let last = h.slice([0..1, seq - 1..seq]);
        let token = ctx.next_token(run, last, pos == 0)?;
        ctx.stats.steps += 1;
        pos += input.len();
        input = vec![token];
        ctx.emit(run, &[token], on_event);
    }
    Ok(())
}
