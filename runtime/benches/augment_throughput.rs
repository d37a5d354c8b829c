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
    // A training loop keeps its batch tensors alive (`*_into`); a fresh batch per step pays
    // for allocating and page-faulting ~19 MB per 32 images. Both are reported.
    let rate = |reuse: bool| -> Result<f64, String> {
        let mut rates = vec![];
        let mut kept = densa_runtime::augment::TwoViewBatch::default();
        for epoch in 0..=epochs {
            let start = Instant::now();
            let mut checksum = 0f64;
            for (b, chunk) in paths.chunks(batch).enumerate() {
                let ids: Vec<u64> = (0..chunk.len() as u64)
                    .map(|i| (b * batch) as u64 + i)
                    .collect();
                let fresh;
                let out = if reuse {
                    pool.install(|| {
                        aug.batch_from_files_into(chunk, &ids, 0, epoch as u64, &mut kept)
                    })
                    .map_err(|e| e.to_string())?;
                    &kept
                } else {
                    fresh = pool
                        .install(|| aug.batch_from_files(chunk, &ids, 0, epoch as u64))
                        .map_err(|e| e.to_string())?;
                    &fresh
                };
                checksum += out.views[0][[0, 0, 0, 0]] as f64 + out.views[1][[0, 2, 5, 5]] as f64;
            }
            let secs = start.elapsed().as_secs_f64();
            std::hint::black_box(checksum);
            if epoch > 0 {
                rates.push(paths.len() as f64 / secs);
            }
        }
        rates.sort_by(f64::total_cmp);
        Ok(rates[rates.len() / 2])
    };
    let reused = rate(true)?;
    let fresh = rate(false)?;
    println!(
        "{{\"peer\": \"densa\", \"images_per_s\": {reused:.2}, \"images_per_s_fresh_batches\": {fresh:.2}, \"threads\": {threads}, \"images\": {}, \"epochs\": {epochs}, \"batch\": {batch}}}",
        paths.len()
    );
    Ok(())
}

/// Single-threaded time per stage of one image's two views (where the time goes).
fn stages(dir: &Path) -> Result<(), String> {
    use densa_runtime::augment::photometric::{
        adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, gaussian_blur,
    };
    use densa_runtime::augment::spatial::resized_crop;
    use densa_runtime::augment::{decode_image, CropBox, Normalize};
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    paths.sort();
    let n = paths.len() as f64;
    // CPU time of this thread (Linux schedstat, ns) next to wall time: on a shared machine the
    // CPU time is the stable number.
    let cpu_ns = || -> Option<f64> {
        let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
        s.split_whitespace().next()?.parse().ok()
    };
    let time = |name: &str, f: &mut dyn FnMut()| {
        let (t, c) = (Instant::now(), cpu_ns());
        f();
        let wall = t.elapsed().as_secs_f64() * 1e3 / n;
        let cpu = cpu_ns().zip(c).map_or(f64::NAN, |(b, a)| (b - a) / 1e6 / n);
        eprintln!("{name:<32} {wall:8.3} ms/image wall {cpu:8.3} ms/image cpu");
    };
    let mut imgs = vec![];
    time("decode", &mut || {
        imgs = paths.iter().map(|p| decode_image(p).unwrap()).collect()
    });
    let mut views = vec![];
    time("2x resized_crop (~60%)", &mut || {
        views = imgs
            .iter()
            .flat_map(|i| {
                let c = CropBox::new(
                    50.0,
                    40.0,
                    50.0 + 0.77 * i.width() as f32,
                    40.0 + 0.77 * i.height() as f32,
                );
                [
                    resized_crop(i, &c, (224, 224), false),
                    resized_crop(i, &c, (224, 224), true),
                ]
            })
            .collect()
    });
    let mut v = views.clone();
    time("2x brightness", &mut || {
        v.iter_mut().for_each(|x| adjust_brightness(x, 1.2))
    });
    time("2x contrast", &mut || {
        v.iter_mut().for_each(|x| adjust_contrast(x, 1.2))
    });
    time("2x saturation", &mut || {
        v.iter_mut().for_each(|x| adjust_saturation(x, 1.2))
    });
    time("2x hue", &mut || {
        v.iter_mut().for_each(|x| adjust_hue(x, 0.05))
    });
    time("2x blur sigma 2 (17 taps)", &mut || {
        v.iter_mut().for_each(|x| *x = gaussian_blur(x, 17, 2.0))
    });
    let mut one = v[0].clone();
    time("2x blur sigma 2, same image", &mut || {
        (0..v.len()).for_each(|_| {
            densa_runtime::augment::photometric::gaussian_blur_in_place(&mut one, 17, 2.0)
        })
    });
    time("2x blur sigma 1 (9 taps)", &mut || {
        v.iter_mut().for_each(|x| *x = gaussian_blur(x, 9, 1.0))
    });
    let norm = Normalize::default();
    time("2x normalize", &mut || {
        v.iter().for_each(|x| {
            std::hint::black_box(norm.to_chw(x));
        })
    });
    let aug = densa_runtime::augment::TwoViewAugment::new(
        densa_runtime::augment::TwoViewConfig::moco_v2(),
    )
    .map_err(|e| e.to_string())?;
    time("two MoCo-v2 views (no decode)", &mut || {
        for (i, img) in imgs.iter().enumerate() {
            std::hint::black_box(aug.apply(
                img,
                densa_runtime::augment::SampleSeed::new(0, 0, i as u64, 0),
            ));
        }
    });
    time("decode + two views, 1 thread", &mut || {
        for (i, p) in paths.iter().enumerate() {
            let img = decode_image(p).unwrap();
            std::hint::black_box(aug.apply(
                &img,
                densa_runtime::augment::SampleSeed::new(0, 0, i as u64, 0),
            ));
        }
    });
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
    let result = if let Some(dir) = value("--stages") {
        stages(Path::new(&dir))
    } else if let Some(dir) = value("--generate") {
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
