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
        let token = if run.options.greedy_on_device() {
            let logits = ctx.model.exit_head(last);
            let ids = if pos == 0 {
                DecodeContext::<B>::device_argmax_checked(logits)
            } else {
                DecodeContext::<B>::device_argmax(logits)
            };
            ctx.read_ids(ids)?[0]
        } else {
            let row = ctx.logit_rows(last)?.remove(0);
            let history = std::mem::take(&mut run.tokens);
            let (token, _) = run.choose(row, &history);
            run.tokens = history;
            token
        };
        ctx.stats.steps += 1;
        pos += input.len();
        input = vec![token];
        ctx.emit(run, &[token], on_event);
    }
    Ok(())
}
