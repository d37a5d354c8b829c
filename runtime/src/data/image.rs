//! Image files: decoding to RGB (JPEG, PNG, BMP, WebP via the `image` crate), writing PNG,
//! and recognising image files by extension.
//!
//! Choices: the format is guessed from the file's first bytes, not its extension (a PNG named
//! `.jpg` decodes); 16-bit and gray images are converted to 8-bit RGB; alpha is dropped;
//! EXIF orientation is not applied (annotations of COCO, VOC and YOLO datasets refer to the
//! stored pixel grid, as pycocotools and PIL's plain `open` read it).

use std::fs::File;
use std::io::{BufWriter, Cursor};
use std::path::Path;

use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder, ImageReader};

use super::DataError;

pub use image::{GrayImage, RgbImage};

/// Extensions (lower case) that image folders and datasets pick up.
pub const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "bmp", "webp"];

/// True when the path's extension (any case) is one of [`IMAGE_EXTENSIONS`].
pub fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Reads and decodes an image file to 8-bit RGB. A missing, unreadable or undecodable file is
/// a [`DataError::Image`] naming the path.
pub fn read_rgb(path: &Path) -> Result<RgbImage, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::Image {
        path: path.to_path_buf(),
        problem: format!("cannot read the file: {e}"),
    })?;
    decode_rgb(&bytes, path)
}

/// Decodes image bytes to 8-bit RGB; `path` names the image in errors.
pub fn decode_rgb(bytes: &[u8], path: &Path) -> Result<RgbImage, DataError> {
    let bad = |problem: String| DataError::Image {
        path: path.to_path_buf(),
        problem,
    };
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?;
    if reader.format().is_none() {
        return Err(bad(format!(
            "not a recognised image ({} bytes; densa decodes JPEG, PNG, BMP and WebP)",
            bytes.len()
        )));
    }
    let image = reader.decode().map_err(|e| bad(e.to_string()))?;
    Ok(image.to_rgb8())
}

/// Reads only the header of an image file: `(width, height)`.
pub fn read_dimensions(path: &Path) -> Result<(u32, u32), DataError> {
    let bad = |problem: String| DataError::Image {
        path: path.to_path_buf(),
        problem,
    };
    ImageReader::open(path)
        .map_err(|e| bad(format!("cannot read the file: {e}")))?
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?
        .into_dimensions()
        .map_err(|e| bad(e.to_string()))
}

/// Writes an 8-bit RGB image as PNG.
pub fn write_png_rgb(path: &Path, image: &RgbImage) -> Result<(), DataError> {
    write_png(
        path,
        image.as_raw(),
        image.width(),
        image.height(),
        ExtendedColorType::Rgb8,
    )
}

/// Writes an 8-bit single-channel image (a semantic mask) as a gray PNG.
pub fn write_png_gray(path: &Path, image: &GrayImage) -> Result<(), DataError> {
    write_png(
        path,
        image.as_raw(),
        image.width(),
        image.height(),
        ExtendedColorType::L8,
    )
}

fn write_png(
    path: &Path,
    pixels: &[u8],
    width: u32,
    height: u32,
    color: ExtendedColorType,
) -> Result<(), DataError> {
    let file = File::create(path).map_err(|e| DataError::io(path, e))?;
    let mut writer = BufWriter::new(file);
    PngEncoder::new(&mut writer)
        .write_image(pixels, width, height, color)
        .map_err(|e| DataError::io(path, std::io::Error::other(e)))?;
    writer
        .into_inner()
        .map_err(|e| DataError::io(path, e.into_error()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trips_and_garbage_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.png");
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
        write_png_rgb(&path, &img).unwrap();
        assert_eq!(read_rgb(&path).unwrap(), img);
        assert_eq!(read_dimensions(&path).unwrap(), (5, 3));

        let bad = dir.path().join("bad.jpg");
        std::fs::write(&bad, b"not an image at all").unwrap();
        let err = read_rgb(&bad).unwrap_err();
        assert!(err.is_bad_image());
        let msg = err.to_string();
        assert!(
            msg.contains("bad.jpg") && msg.contains("not a recognised image"),
            "{msg}"
        );

        // A truncated PNG: recognised, but the decoder fails.
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.png");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let msg = read_rgb(&cut).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!("{}: bad image:", cut.display())),
            "{msg}"
        );

        let missing = dir.path().join("missing.png");
        let err = read_rgb(&missing).unwrap_err();
        assert!(err.is_bad_image() && err.to_string().contains("missing.png"));
    }

    #[test]
    fn recognises_image_extensions_in_any_case() {
        assert!(is_image_file(Path::new("a/b.JPG")));
        assert!(is_image_file(Path::new("b.webp")));
        assert!(!is_image_file(Path::new("b.txt")));
        assert!(!is_image_file(Path::new("png")));
    }
}
