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
    let mut input = run.tokens().to_vec();
    let mut pos = 0;
    while run.is_running() {
        let h = ctx.layers(ctx.model().embed_ids(&input), 0..exit, pos)?;
        let seq = h.dims()[1];
        // Non-finite logits are checked on the prompt's step (see `device_argmax_checked`).
        let token = ctx.next_token(run, h.slice([0..1, seq - 1..seq]), pos == 0)?;
        ctx.count_step();
        pos += input.len();
        input = vec![token];
        ctx.emit(run, &[token], on_event);
    }
    Ok(())
}
