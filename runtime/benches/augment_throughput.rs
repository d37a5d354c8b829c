//! Two-view MoCo-v2 augmentation throughput: decode a JPEG, make two 224 px views
//! (RandomResizedCrop, flip, colour jitter, grayscale, blur, normalise), batch them into
//! `[N, 3, 224, 224]` tensors; rayon over samples. `benches/augment_throughput.sh` runs it
//! next to the same pipeline in torchvision (`benches/augment_torchvision.py`) and prints the
//! ratio.
//!
//! ```text
//! cargo bench -p densa-runtime --bench augment_throughput -- --generate DIR [--count 64]
//! cargo bench -p densa-runtime --bench augment_throughput -- --dir DIR [--threads N]
//!     [--epochs 5] [--batch 32]
//! ```
//! Prints one JSON line: images (two views each) per second, median over epochs after one
//! warm-up epoch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use densa_runtime::augment::{TwoViewAugment, TwoViewConfig};
use image::{Rgb, RgbImage};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A deterministic "photo-like" scene: smooth background, shapes, texture noise.
fn synthetic_photo(index: u64, width: u32, height: u32) -> RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(0xD5A_0000 + index);
    let base: [f32; 3] = std::array::from_fn(|_| rng.random_range(40.0..200.0));
    let grad: [f32; 3] = std::array::from_fn(|_| rng.random_range(-80.0..80.0));
    let mut img = RgbImage::from_fn(width, height, |x, y| {
        let t = (x as f32 / width as f32 + y as f32 / height as f32) * 0.5;
        Rgb(std::array::from_fn(|c| {
            (base[c] + grad[c] * t).clamp(0.0, 255.0) as u8
        }))
    });
    for _ in 0..rng.random_range(6..14) {
        let (cx, cy) = (
            rng.random_range(0..width) as f32,
            rng.random_range(0..height) as f32,
        );
        let (rx, ry) = (
            rng.random_range(15.0..160.0f32),
            rng.random_range(15.0..160.0f32),
        );
        let colour: [u8; 3] = std::array::from_fn(|_| rng.random_range(0..=255));
        let ellipse = rng.random_bool(0.5);
        let y0 = (cy - ry).max(0.0) as u32;
        let y1 = ((cy + ry) as u32).min(height);
        let x0 = (cx - rx).max(0.0) as u32;
        let x1 = ((cx + rx) as u32).min(width);
        for y in y0..y1 {
            for x in x0..x1 {
                let (dx, dy) = ((x as f32 - cx) / rx, (y as f32 - cy) / ry);
                if !ellipse || dx * dx + dy * dy <= 1.0 {
                    img.put_pixel(x, y, Rgb(colour));
                }
            }
        }
    }
    for p in img.pixels_mut() {
        let n = rng.random_range(-12i16..=12);
        for v in &mut p.0 {
            *v = (*v as i16 + n).clamp(0, 255) as u8;
        }
    }
    img
}

fn generate(dir: &Path, count: u64) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for i in 0..count {
        // Mostly landscape 640x480 with some portrait and off-size images.
        let (w, h) = match i % 4 {
            0 | 1 => (640, 480),
            2 => (480, 640),
            _ => (600 + (i as u32 * 13) % 80, 420 + (i as u32 * 7) % 60),
        };
        let img = synthetic_photo(i, w, h);
        let path = dir.join(format!("img_{i:04}.jpg"));
        let file = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut enc =
            image::codecs::jpeg::JpegEncoder::new_with_quality(std::io::BufWriter::new(file), 90);
        enc.encode_image(&img)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn run(dir: &Path, threads: usize, epochs: usize, batch: usize) -> Result<(), String> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(format!("{}: no .jpg files", dir.display()));
    }
    let aug = TwoViewAugment::new(TwoViewConfig::moco_v2()).map_err(|e| e.to_string())?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| e.to_string())?;
    let mut rates = vec![];
    for epoch in 0..=epochs {
        let start = Instant::now();
        let mut checksum = 0f64;
        for (b, chunk) in paths.chunks(batch).enumerate() {
            let ids: Vec<u64> = (0..chunk.len() as u64)
                .map(|i| (b * batch) as u64 + i)
                .collect();
            let out = pool
                .install(|| aug.batch_from_files(chunk, &ids, 0, epoch as u64))
                .map_err(|e| e.to_string())?;
            checksum += out.views[0][[0, 0, 0, 0]] as f64 + out.views[1][[0, 2, 5, 5]] as f64;
        }
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(checksum);
        if epoch > 0 {
            rates.push(paths.len() as f64 / secs);
        }
    }
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    println!(
        "{{\"peer\": \"densa\", \"images_per_s\": {median:.2}, \"threads\": {threads}, \"images\": {}, \"epochs\": {epochs}, \"batch\": {batch}}}",
        paths.len()
    );
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let number = |flag: &str, default: usize| -> usize {
        value(flag).map_or(default, |v| {
            v.parse().unwrap_or_else(|_| {
                eprintln!("{flag} {v}: not a number");
                std::process::exit(2)
            })
        })
    };
    let result = if let Some(dir) = value("--generate") {
        generate(Path::new(&dir), number("--count", 64) as u64)
    } else if let Some(dir) = value("--dir") {
        let threads = number(
            "--threads",
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        );
        run(
            Path::new(&dir),
            threads,
            number("--epochs", 5).max(1),
            number("--batch", 32).max(1),
        )
    } else {
        // `cargo bench` without arguments: nothing to measure against, say how to run it.
        eprintln!("usage: augment_throughput --generate DIR [--count N] | --dir DIR [--threads N] [--epochs E] [--batch B]\n(benches/augment_throughput.sh runs both peers)");
        Ok(())
    };
    if let Err(e) = result {
        eprintln!("augment_throughput: {e}");
        std::process::exit(1);
    }
}
