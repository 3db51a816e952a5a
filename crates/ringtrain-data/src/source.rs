//! Opening files that may be gzip-compressed, and reading them line by line with positions.
//!
//! Compression is recognised by the gzip magic bytes rather than the file name, so a renamed
//! file still reads; a `.gz` name without the magic is refused, because that is almost always
//! a download or copy gone wrong that would otherwise surface as a confusing parse error.

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use crate::error::DataError;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A possibly decompressed byte stream plus what is needed to report errors in it.
pub(crate) struct Source {
    pub(crate) reader: Box<dyn BufRead>,
    pub(crate) path: PathBuf,
    pub(crate) gzip: bool,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("path", &self.path)
            .field("gzip", &self.gzip)
            .finish_non_exhaustive()
    }
}

impl Source {
    pub(crate) fn open(path: &Path) -> Result<Self, DataError> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let mut raw = BufReader::new(file);
        let head = raw.fill_buf().map_err(|e| DataError::io(path, e))?;
        let is_gzip = head.starts_with(&GZIP_MAGIC);
        let named_gz = path.extension().is_some_and(|ext| ext.eq_ignore_ascii_case("gz"));
        if named_gz && !is_gzip {
            if head.is_empty() {
                return Err(DataError::empty(path, "empty file"));
            }
            return Err(DataError::binary(
                path,
                0,
                "not a gzip stream (the name ends in .gz but the magic bytes 1f 8b are missing)",
            ));
        }
        let reader: Box<dyn BufRead> = if is_gzip {
            Box::new(BufReader::new(GzDecoder::new(raw)))
        } else {
            Box::new(raw)
        };
        Ok(Source {
            reader,
            path: path.to_path_buf(),
            gzip: is_gzip,
        })
    }

    /// Turns a failed read at `offset` (of the decompressed stream) into an error that says
    /// whether the compression or the disk failed.
    pub(crate) fn read_error(&self, offset: u64, err: std::io::Error) -> DataError {
        if self.gzip
            && matches!(
                err.kind(),
                ErrorKind::InvalidData | ErrorKind::InvalidInput | ErrorKind::UnexpectedEof
            )
        {
            DataError::binary(
                &self.path,
                offset,
                format!("corrupt or truncated gzip stream (offset counts decompressed bytes): {err}"),
            )
        } else {
            DataError::io(&self.path, err)
        }
    }

    /// Reads everything into a UTF-8 string.
    pub(crate) fn read_to_string(mut self) -> Result<String, DataError> {
        let mut bytes = Vec::new();
        if let Err(e) = self.reader.read_to_end(&mut bytes) {
            return Err(self.read_error(bytes.len() as u64, e));
        }
        String::from_utf8(bytes).map_err(|e| {
            let offset = e.utf8_error().valid_up_to() as u64;
            DataError::binary(&self.path, offset, "not valid UTF-8")
        })
    }
}

/// Line-by-line reader that knows the 1-based line number and strips `\n` / `\r\n`.
#[derive(Debug)]
pub(crate) struct Lines {
    source: Source,
    line: usize,
    offset: u64,
    buf: Vec<u8>,
}

impl Lines {
    pub(crate) fn open(path: &Path) -> Result<Self, DataError> {
        Ok(Lines {
            source: Source::open(path)?,
            line: 0,
            offset: 0,
            buf: Vec::new(),
        })
    }

    /// The next line and its 1-based number, or `None` at the end of the file.
    pub(crate) fn next_line(&mut self) -> Result<Option<(usize, &str)>, DataError> {
        self.buf.clear();
        let n = match self.source.reader.read_until(b'\n', &mut self.buf) {
            Ok(n) => n,
            Err(e) => return Err(self.source.read_error(self.offset, e)),
        };
        if n == 0 {
            return Ok(None);
        }
        self.offset += n as u64;
        self.line += 1;
        let mut end = self.buf.len();
        if self.buf[..end].ends_with(b"\n") {
            end -= 1;
        }
        if self.buf[..end].ends_with(b"\r") {
            end -= 1;
        }
        let line = self.line;
        match std::str::from_utf8(&self.buf[..end]) {
            Ok(text) => Ok(Some((line, text))),
            Err(_) => Err(DataError::text(&self.source.path, line, None, "not valid UTF-8")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_plain_and_gzip_lines_alike() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("a.txt");
        std::fs::write(&plain, "x\r\ny\n\nz").unwrap();
        let gz = dir.path().join("a.txt.gz");
        let mut enc = flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::default());
        enc.write_all(b"x\r\ny\n\nz").unwrap();
        enc.finish().unwrap();
        for path in [plain, gz] {
            let mut lines = Lines::open(&path).unwrap();
            let mut got = Vec::new();
            while let Some((n, text)) = lines.next_line().unwrap() {
                got.push((n, text.to_string()));
            }
            let want: Vec<(usize, String)> = vec![(1, "x".into()), (2, "y".into()), (3, "".into()), (4, "z".into())];
            assert_eq!(got, want);
        }
    }

    #[test]
    fn gz_name_without_magic_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.tsv.gz");
        std::fs::write(&path, "0\thello\n").unwrap();
        let err = Lines::open(&path).unwrap_err();
        assert!(err.to_string().contains("not a gzip stream"), "{err}");
    }

    #[test]
    fn gzip_garbage_after_magic_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.txt.gz");
        std::fs::write(&path, [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xff, 0xfe, 0x00, 0x12]).unwrap();
        let mut lines = Lines::open(&path).unwrap();
        let err = loop {
            match lines.next_line() {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("garbage decoded without error"),
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("gzip"), "{err}");
    }
}
