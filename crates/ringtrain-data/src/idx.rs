//! IDX files (the MNIST format), plain or gzip-compressed.
//!
//! Layout, all integers big-endian: two zero bytes, a type byte (`0x08` u8, `0x09` i8, `0x0B`
//! i16, `0x0C` i32, `0x0D` f32, `0x0E` f64), a dimension count `d`, then `d` u32 sizes, then
//! the product of the sizes elements, row-major. The reader checks every part of that and
//! refuses, naming the byte offset (of the decompressed stream for `.gz` files): a wrong magic,
//! zero dimensions, a size product that overflows, data shorter than the header promises, and
//! bytes after the data (which would mean the header and data disagree).

use std::io::{BufRead, Read};
use std::path::Path;

use crate::error::DataError;
use crate::source::Source;

/// The elements of an IDX array, in the file's own type.
#[derive(Debug, Clone, PartialEq)]
pub enum IdxData {
    /// Type `0x08`.
    U8(Vec<u8>),
    /// Type `0x09`.
    I8(Vec<i8>),
    /// Type `0x0B`.
    I16(Vec<i16>),
    /// Type `0x0C`.
    I32(Vec<i32>),
    /// Type `0x0D`.
    F32(Vec<f32>),
    /// Type `0x0E`.
    F64(Vec<f64>),
}

impl IdxData {
    fn type_name(&self) -> &'static str {
        match self {
            IdxData::U8(_) => "u8",
            IdxData::I8(_) => "i8",
            IdxData::I16(_) => "i16",
            IdxData::I32(_) => "i32",
            IdxData::F32(_) => "f32",
            IdxData::F64(_) => "f64",
        }
    }
}

/// An n-dimensional array read from an IDX file.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray {
    /// Sizes of the dimensions, outermost first.
    pub dims: Vec<usize>,
    /// Row-major elements; `dims.iter().product()` of them.
    pub data: IdxData,
}

/// Reads any IDX file.
pub fn read_idx(path: &Path) -> Result<IdxArray, DataError> {
    let mut source = Source::open(path)?;
    match source.reader.fill_buf() {
        // Say so plainly rather than blame the magic number.
        Ok([]) => return Err(DataError::empty(path, "empty file")),
        Ok(_) => {}
        Err(e) => return Err(source.read_error(0, e)),
    }
    let mut offset = 0u64;
    let mut read_exact = |source: &mut Source, buf: &mut [u8], what: &str| {
        let at = offset;
        match source.reader.read_exact(buf) {
            Ok(()) => {
                offset += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !source.gzip => Err(DataError::binary(
                &source.path,
                at,
                format!("file ends inside the {what}"),
            )),
            Err(e) => Err(source.read_error(at, e)),
        }
    };

    let mut magic = [0u8; 4];
    read_exact(&mut source, &mut magic, "4-byte magic number")?;
    if magic[0] != 0 || magic[1] != 0 {
        return Err(DataError::binary(
            path,
            0,
            format!(
                "not an IDX file: magic starts {:02x} {:02x}, expected 00 00",
                magic[0], magic[1]
            ),
        ));
    }
    let elem_size = match magic[2] {
        0x08 | 0x09 => 1,
        0x0B => 2,
        0x0C | 0x0D => 4,
        0x0E => 8,
        other => {
            return Err(DataError::binary(
                path,
                2,
                format!("unknown IDX element type 0x{other:02x}"),
            ))
        }
    };
    let n_dims = usize::from(magic[3]);
    if n_dims == 0 {
        return Err(DataError::binary(path, 3, "IDX header has zero dimensions"));
    }
    let mut dims = Vec::with_capacity(n_dims);
    for d in 0..n_dims {
        let mut size = [0u8; 4];
        read_exact(&mut source, &mut size, &format!("size of dimension {d}"))?;
        dims.push(u32::from_be_bytes(size) as usize);
    }
    let header_len = 4 + 4 * n_dims as u64;
    let n_bytes = dims
        .iter()
        .try_fold(elem_size, |acc: usize, &d| acc.checked_mul(d))
        .ok_or_else(|| DataError::binary(path, 4, format!("dimensions {dims:?} overflow the address space")))?;

    // Capacity is capped so that a corrupt header cannot make us allocate gigabytes up front.
    let mut bytes = Vec::with_capacity(n_bytes.min(1 << 26));
    let got = (&mut source.reader).take(n_bytes as u64).read_to_end(&mut bytes);
    if let Err(e) = got {
        return Err(source.read_error(header_len + bytes.len() as u64, e));
    }
    if bytes.len() < n_bytes {
        return Err(DataError::binary(
            path,
            header_len + bytes.len() as u64,
            format!(
                "truncated: dimensions {dims:?} need {n_bytes} data bytes (file length {}), \
                 but the data ends here",
                header_len + n_bytes as u64
            ),
        ));
    }
    let mut extra = [0u8; 1];
    match source.reader.read(&mut extra) {
        Ok(0) => {}
        Ok(_) => {
            return Err(DataError::binary(
                path,
                header_len + n_bytes as u64,
                format!("trailing data after the {n_bytes} data bytes that dimensions {dims:?} call for"),
            ))
        }
        Err(e) => return Err(source.read_error(header_len + n_bytes as u64, e)),
    }

    let data = match magic[2] {
        0x08 => IdxData::U8(bytes),
        0x09 => IdxData::I8(bytes.into_iter().map(|b| b as i8).collect()),
        0x0B => IdxData::I16(
            bytes
                .chunks_exact(2)
                .map(|c| i16::from_be_bytes([c[0], c[1]]))
                .collect(),
        ),
        0x0C => IdxData::I32(
            bytes
                .chunks_exact(4)
                .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        0x0D => IdxData::F32(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        _ => IdxData::F64(
            bytes
                .chunks_exact(8)
                .map(|c| f64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        ),
    };
    Ok(IdxArray { dims, data })
}

/// A stack of greyscale images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Images {
    /// Number of images.
    pub n: usize,
    /// Pixel rows per image.
    pub rows: usize,
    /// Pixel columns per image.
    pub cols: usize,
    /// `n x rows x cols` bytes, image after image, each row-major.
    pub pixels: Vec<u8>,
}

impl Images {
    /// Pixels of image `i`.
    ///
    /// # Panics
    /// If `i >= n`.
    pub fn image(&self, i: usize) -> &[u8] {
        let size = self.rows * self.cols;
        &self.pixels[i * size..(i + 1) * size]
    }

    /// Pixels of the images at `indices`, scaled to `[0, 1]`, as one row-major
    /// `indices.len() x rows x cols` buffer (a training batch).
    pub fn batch_f32(&self, indices: &[usize]) -> Vec<f32> {
        let mut out = Vec::with_capacity(indices.len() * self.rows * self.cols);
        for &i in indices {
            out.extend(self.image(i).iter().map(|&p| f32::from(p) / 255.0));
        }
        out
    }
}

fn expect_u8(path: &Path, array: IdxArray, n_dims: usize, what: &str) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    if array.dims.len() != n_dims {
        return Err(DataError::binary(
            path,
            3,
            format!("{what} need {n_dims} dimensions, the header has {}", array.dims.len()),
        ));
    }
    match array.data {
        IdxData::U8(bytes) => Ok((array.dims, bytes)),
        other => Err(DataError::binary(
            path,
            2,
            format!(
                "{what} need element type u8 (0x08), the header says {}",
                other.type_name()
            ),
        )),
    }
}

/// Reads an `idx3` u8 image file (e.g. `train-images-idx3-ubyte.gz`).
pub fn read_idx_images(path: &Path) -> Result<Images, DataError> {
    let (dims, pixels) = expect_u8(path, read_idx(path)?, 3, "images")?;
    Ok(Images {
        n: dims[0],
        rows: dims[1],
        cols: dims[2],
        pixels,
    })
}

/// Reads an `idx1` u8 label file (e.g. `train-labels-idx1-ubyte.gz`).
pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    Ok(expect_u8(path, read_idx(path)?, 1, "labels")?.1)
}

/// One side of MNIST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MnistSplit {
    /// 28x28 images.
    pub images: Images,
    /// Digits 0..=9, one per image.
    pub labels: Vec<u8>,
}

/// MNIST's training and test sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mnist {
    /// 60,000 examples in the standard files.
    pub train: MnistSplit,
    /// 10,000 examples in the standard files.
    pub test: MnistSplit,
}

fn existing(dir: &Path, stem: &str) -> std::path::PathBuf {
    let gz = dir.join(format!("{stem}.gz"));
    if gz.exists() {
        gz
    } else {
        dir.join(stem)
    }
}

/// Reads one MNIST pair, e.g. `prefix = "t10k"`, checking that counts match and labels are
/// digits.
pub fn load_mnist_split(dir: &Path, prefix: &str) -> Result<MnistSplit, DataError> {
    let images_path = existing(dir, &format!("{prefix}-images-idx3-ubyte"));
    let labels_path = existing(dir, &format!("{prefix}-labels-idx1-ubyte"));
    let images = read_idx_images(&images_path)?;
    let labels = read_idx_labels(&labels_path)?;
    if labels.len() != images.n {
        return Err(DataError::binary(
            &labels_path,
            4,
            format!(
                "{} labels for {} images in {}",
                labels.len(),
                images.n,
                images_path.display()
            ),
        ));
    }
    if let Some(i) = labels.iter().position(|&l| l > 9) {
        return Err(DataError::binary(
            &labels_path,
            8 + i as u64,
            format!("label {} is not a digit", labels[i]),
        ));
    }
    Ok(MnistSplit { images, labels })
}

/// Reads MNIST from a directory holding LeCun's four files (each `.gz` or uncompressed).
pub fn load_mnist(dir: &Path) -> Result<Mnist, DataError> {
    Ok(Mnist {
        train: load_mnist_split(dir, "train")?,
        test: load_mnist_split(dir, "t10k")?,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx_bytes(type_byte: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, type_byte, dims.len() as u8];
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn reads_images_plain_and_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let raw = idx_bytes(0x08, &[2, 2, 3], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 255]);
        for path in [write(&dir, "a.idx", &raw), write(&dir, "a.idx.gz", &gzip(&raw))] {
            let images = read_idx_images(&path).unwrap();
            assert_eq!((images.n, images.rows, images.cols), (2, 2, 3));
            assert_eq!(images.image(1), [6, 7, 8, 9, 10, 255]);
            assert_eq!(images.batch_f32(&[1])[5], 1.0);
        }
    }

    #[test]
    fn reads_wider_types_big_endian() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = Vec::new();
        data.extend_from_slice(&(-2i32).to_be_bytes());
        data.extend_from_slice(&70000i32.to_be_bytes());
        let path = write(&dir, "i.idx", &idx_bytes(0x0C, &[2], &data));
        assert_eq!(read_idx(&path).unwrap().data, IdxData::I32(vec![-2, 70000]));
        let path = write(&dir, "f.idx", &idx_bytes(0x0D, &[1], &1.5f32.to_be_bytes()));
        assert_eq!(read_idx(&path).unwrap().data, IdxData::F32(vec![1.5]));
    }

    #[test]
    fn wrong_magic_is_refused_at_byte_0() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "m.idx", b"PK\x03\x04 definitely a zip");
        let err = read_idx(&path).unwrap_err();
        assert!(err.to_string().contains("byte 0: not an IDX file"), "{err}");
        let path = write(&dir, "t.idx", &idx_bytes(0x07, &[1], &[0]));
        let err = read_idx(&path).unwrap_err();
        assert!(
            err.to_string().contains("byte 2: unknown IDX element type 0x07"),
            "{err}"
        );
    }

    #[test]
    fn empty_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_idx(&write(&dir, "e.idx", b"")).unwrap_err();
        assert!(matches!(err, DataError::Empty { .. }), "{err}");
        let err = read_idx(&write(&dir, "e.idx.gz", b"")).unwrap_err();
        assert!(matches!(err, DataError::Empty { .. }), "{err}");
        let err = read_idx(&write(&dir, "s.idx", b"\0\0")).unwrap_err();
        assert!(
            err.to_string().contains("byte 0: file ends inside the 4-byte magic"),
            "{err}"
        );
    }

    #[test]
    fn truncated_data_names_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let raw = idx_bytes(0x08, &[3, 2, 2], &[0; 10]);
        let path = write(&dir, "t.idx", &raw);
        let err = read_idx(&path).unwrap_err();
        assert!(err.to_string().contains("byte 26: truncated"), "{err}");
        assert!(err.to_string().contains("need 12 data bytes (file length 28)"), "{err}");
        // Truncated inside the header.
        let path = write(&dir, "h.idx", &raw[..9]);
        let err = read_idx(&path).unwrap_err();
        assert!(
            err.to_string()
                .contains("byte 8: file ends inside the size of dimension 1"),
            "{err}"
        );
        // Same data gzip-compressed: the logical stream is short, not the compression.
        let path = write(&dir, "t.idx.gz", &gzip(&raw));
        let err = read_idx(&path).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn truncated_gzip_stream_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let raw = idx_bytes(0x08, &[1000], &[7; 1000]);
        let compressed = gzip(&raw);
        let path = write(&dir, "c.idx.gz", &compressed[..compressed.len() / 2]);
        let err = read_idx(&path).unwrap_err();
        assert!(matches!(err, DataError::Binary { .. }), "{err}");
        assert!(err.to_string().contains("gzip"), "{err}");
    }

    #[test]
    fn gzip_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut garbage = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
        garbage.extend((0..200u32).map(|i| (i * 37 % 251) as u8));
        let path = write(&dir, "g.idx.gz", &garbage);
        let err = read_idx(&path).unwrap_err();
        assert!(err.to_string().contains("gzip"), "{err}");
        let path = write(&dir, "n.idx.gz", &idx_bytes(0x08, &[1], &[1]));
        let err = read_idx(&path).unwrap_err();
        assert!(err.to_string().contains("not a gzip stream"), "{err}");
    }

    #[test]
    fn trailing_bytes_and_wrong_rank_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "x.idx", &idx_bytes(0x08, &[2], &[1, 2, 3]));
        let err = read_idx(&path).unwrap_err();
        assert!(err.to_string().contains("byte 10: trailing data"), "{err}");
        let path = write(&dir, "l.idx", &idx_bytes(0x08, &[2, 1], &[1, 2]));
        let err = read_idx_labels(&path).unwrap_err();
        assert!(err.to_string().contains("labels need 1 dimensions"), "{err}");
        let path = write(&dir, "z.idx", &idx_bytes(0x08, &[], &[]));
        assert!(read_idx(&path).unwrap_err().to_string().contains("zero dimensions"));
        let path = write(&dir, "o.idx", &idx_bytes(0x0E, &[u32::MAX, u32::MAX, u32::MAX], &[]));
        assert!(read_idx(&path).unwrap_err().to_string().contains("overflow"));
    }

    #[test]
    fn mnist_pair_checks_counts_and_digits() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir, "t10k-images-idx3-ubyte", &idx_bytes(0x08, &[2, 1, 1], &[5, 6]));
        write(&dir, "t10k-labels-idx1-ubyte", &idx_bytes(0x08, &[2], &[3, 12]));
        let err = load_mnist_split(dir.path(), "t10k").unwrap_err();
        assert!(err.to_string().contains("byte 9: label 12 is not a digit"), "{err}");
        write(&dir, "t10k-labels-idx1-ubyte", &idx_bytes(0x08, &[1], &[3]));
        let err = load_mnist_split(dir.path(), "t10k").unwrap_err();
        assert!(err.to_string().contains("1 labels for 2 images"), "{err}");
        write(&dir, "t10k-labels-idx1-ubyte", &idx_bytes(0x08, &[2], &[3, 4]));
        let split = load_mnist_split(dir.path(), "t10k").unwrap();
        assert_eq!(split.labels, [3, 4]);
    }
}
