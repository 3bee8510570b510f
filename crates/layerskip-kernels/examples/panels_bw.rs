//! Products of SmolLM2-135M's weight shapes (30 layers and the tied head) with a few rows, as
//! one decode step (1 row) or a verification pass (several rows) computes them: milliseconds
//! per pass and the weight bytes streamed per second. `LAYERSKIP_THREADS` sets the threads.
//!
//! `cargo run --release -p layerskip-kernels --example panels_bw -- [f32|bf16|q8_0|q4_0] [rows]`
use layerskip_kernels::cpu::rows::{Panels, Quantization, x_panels};
use std::time::Instant;

fn main() {
    let threads = std::env::var("LAYERSKIP_THREADS").ok();
    layerskip_kernels::cpu::configure(layerskip_kernels::cpu::CpuOptions {
        threads: threads.map(|t| t.parse().expect("LAYERSKIP_THREADS: a number")),
        ..Default::default()
    });
    let format = std::env::args().nth(1).unwrap_or_else(|| "bf16".into());
    let rows: usize = std::env::args()
        .nth(2)
        .map_or(1, |r| r.parse().expect("rows"));
    let h = 576;
    let mut shapes = Vec::new();
    for _ in 0..30 {
        shapes.extend([
            (h, h),
            (h, 192),
            (h, 192),
            (h, h),
            (h, 1536),
            (h, 1536),
            (1536, h),
        ]);
    }
    shapes.push((h, 49152));
    let mut s = 1u64;
    let mut value = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        if format == "bf16" {
            f32::from_bits(v.to_bits() & 0xffff_0000)
        } else {
            v
        }
    };
    let (mats, bytes_per_weight): (Vec<Panels>, f64) = match format.as_str() {
        "f32" | "bf16" => (
            shapes
                .iter()
                .map(|&(k, n)| {
                    Panels::from_in_out(&(0..k * n).map(|_| value()).collect::<Vec<_>>(), k, n)
                })
                .collect(),
            if format == "bf16" { 2.0 } else { 4.0 },
        ),
        q => {
            let q: Quantization = q.parse().expect("format");
            let bytes = match q {
                Quantization::Q8_0 => 36.0 / 32.0,
                Quantization::Q4_0 | Quantization::Q4_1 => 20.0 / 32.0,
            };
            (
                shapes
                    .iter()
                    .map(|&(k, n)| {
                        let w: Vec<f32> = (0..k * n).map(|_| value()).collect();
                        Panels::quantized(&w, k, n, false, q).expect("k is a multiple of 32")
                    })
                    .collect(),
                bytes,
            )
        }
    };
    let bytes = shapes.iter().map(|&(k, n)| k * n).sum::<usize>() as f64 * bytes_per_weight;
    let x: Vec<f32> = (0..1536 * rows).map(|i| (i as f32 * 0.01).sin()).collect();
    let mut out = vec![0f32; 49152 * rows];
    let mut best = f64::MAX;
    for _ in 0..15 {
        let t = Instant::now();
        for (m, &(k, n)) in mats.iter().zip(&shapes) {
            x_panels(&x[..k * rows], m, &mut out[..n * rows], rows, n);
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{format} rows={rows}: {:.2} ms per pass, {:.1} GB/s of weights ({})",
        best * 1e3,
        bytes / best / 1e9,
        out[7]
    );
}
