//! `.npy` / `.npz` files to and from tract tensors (npyz parses each array, zip holds them).

use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use npyz::{DType, NpyFile, Order, TypeChar, WriterBuilder};
use tract_core::prelude::*;

/// Named tensors in file order, as held by one `.npz` (or one `.npy` named after its file stem).
pub type NamedTensors = Vec<(String, Tensor)>;

/// Reads a `.npz` (every array) or a `.npy` (one array named after the file stem).
pub fn read_tensors(path: &Path) -> Result<NamedTensors> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let is_npy = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    if is_npy {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let t = read_npy(BufReader::new(file))
            .with_context(|| format!("{} is not a readable .npy file", path.display()))?;
        return Ok(vec![(stem, t)]);
    }
    read_npz(BufReader::new(file)).with_context(|| format!("reading {}", path.display()))
}

/// Reads every array of an `.npz` archive, in archive order.
pub fn read_npz<R: Read + Seek>(reader: R) -> Result<NamedTensors> {
    let mut zip = zip::ZipArchive::new(reader)
        .context("not a valid .npz (zip) archive: truncated or not made by numpy.savez?")?;
    let mut out = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).context("corrupted .npz entry")?;
        let entry_name = entry.name().to_string();
        let name = entry_name
            .strip_suffix(".npy")
            .unwrap_or(&entry_name)
            .to_string();
        // Read the entry fully: zip entries are not seekable and npyz wants a plain reader.
        let mut bytes = Vec::with_capacity(entry.size().min(1 << 30) as usize);
        entry
            .read_to_end(&mut bytes)
            .with_context(|| format!("array `{name}`: corrupted or truncated .npz entry"))?;
        let tensor = read_npy(Cursor::new(bytes)).with_context(|| format!("array `{name}`"))?;
        out.push((name, tensor));
    }
    Ok(out)
}

/// Reads one `.npy` stream into a tensor (C or Fortran order, any numeric or bool dtype).
pub fn read_npy<R: Read>(reader: R) -> Result<Tensor> {
    let npy = NpyFile::new(reader).context("bad .npy header")?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let order = npy.order();
    let DType::Plain(ts) = npy.dtype() else {
        bail!("structured dtypes are not supported: save a plain numeric array");
    };
    let size = ts.size_field();
    macro_rules! read {
        ($t:ty) => {{
            let data: Vec<$t> = npy
                .into_vec()
                .context("array data is truncated or corrupted")?;
            tensor_from(&shape, order, data)?
        }};
    }
    let tensor = match (ts.type_char(), size) {
        (TypeChar::Float, 4) => read!(f32),
        (TypeChar::Float, 8) => read!(f64),
        (TypeChar::Float, 2) => read!(f16),
        (TypeChar::Int, 1) => read!(i8),
        (TypeChar::Int, 2) => read!(i16),
        (TypeChar::Int, 4) => read!(i32),
        (TypeChar::Int, 8) => read!(i64),
        (TypeChar::Uint, 1) => read!(u8),
        (TypeChar::Uint, 2) => read!(u16),
        (TypeChar::Uint, 4) => read!(u32),
        (TypeChar::Uint, 8) => read!(u64),
        (TypeChar::Bool, _) => read!(bool),
        _ => bail!("unsupported dtype `{ts}`: use a float, int, uint or bool array"),
    };
    Ok(tensor)
}

fn tensor_from<T: Datum + Copy>(shape: &[usize], order: Order, data: Vec<T>) -> Result<Tensor> {
    let expected: usize = shape.iter().product();
    if data.len() != expected {
        bail!(
            "array data holds {} values, shape {:?} needs {}",
            data.len(),
            shape,
            expected
        );
    }
    match order {
        Order::C => Ok(Tensor::from_shape(shape, &data)?),
        Order::Fortran => {
            // Fortran order is C order of the reversed shape, transposed back.
            let rev: Vec<usize> = shape.iter().rev().copied().collect();
            let t = Tensor::from_shape(&rev, &data)?;
            let perm: Vec<usize> = (0..shape.len()).rev().collect();
            Ok(t.permute_axes(&perm)?)
        }
    }
}

/// Writes one tensor as an `.npy` stream.
pub fn write_npy<W: Write>(w: W, tensor: &Tensor) -> Result<()> {
    let shape: Vec<u64> = tensor.shape().iter().map(|&d| d as u64).collect();
    macro_rules! write {
        ($t:ty) => {{
            let mut writer = npyz::WriteOptions::<$t>::new()
                .default_dtype()
                .shape(&shape)
                .writer(w)
                .begin_nd()?;
            writer.extend(crate::slice_of::<$t>(tensor)?.iter().copied())?;
            writer.finish()?;
        }};
    }
    match tensor.datum_type().unquantized() {
        DatumType::F32 => write!(f32),
        DatumType::F64 => write!(f64),
        DatumType::F16 => write!(f16),
        DatumType::I8 => write!(i8),
        DatumType::I16 => write!(i16),
        DatumType::I32 => write!(i32),
        DatumType::I64 => write!(i64),
        DatumType::U8 => write!(u8),
        DatumType::U16 => write!(u16),
        DatumType::U32 => write!(u32),
        DatumType::U64 => write!(u64),
        DatumType::Bool => write!(bool),
        dt => bail!("cannot write a {dt:?} tensor to .npy"),
    }
    Ok(())
}

/// Serializes named tensors as an (uncompressed, deterministic) `.npz` archive in memory.
pub fn npz_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    // Fixed timestamp and no compression: byte-identical output for identical tensors.
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .last_modified_time(zip::DateTime::default())
        .large_file(
            tensors
                .iter()
                .any(|(_, t)| t.len() * t.datum_type().size_of() > 1 << 31),
        );
    for (name, t) in tensors {
        zip.start_file(format!("{name}.npy"), opts)?;
        let mut buf = Vec::new();
        write_npy(&mut buf, t).with_context(|| format!("array `{name}`"))?;
        zip.write_all(&buf)?;
    }
    Ok(zip.finish()?.into_inner())
}

/// Writes named tensors to `path` as `.npz` (or `.npy` for a single tensor), atomically.
pub fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let is_npy = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    let bytes = if is_npy {
        let [(_, t)] = tensors else {
            bail!(
                "{}: a .npy file holds one array, got {}; use .npz",
                path.display(),
                tensors.len()
            );
        };
        let mut buf = Vec::new();
        write_npy(&mut buf, t)?;
        buf
    } else {
        npz_bytes(tensors)?
    };
    crate::fsutil::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(tensors: NamedTensors) {
        let bytes = npz_bytes(&tensors).unwrap();
        let back = read_npz(Cursor::new(bytes.clone())).unwrap();
        assert_eq!(back, tensors);
        assert_eq!(
            npz_bytes(&back).unwrap(),
            bytes,
            "npz output must be deterministic"
        );
    }

    #[test]
    fn round_trips_every_dtype() {
        check(vec![
            ("a".into(), tensor2(&[[1.0f32, -2.5], [3.0, 4.0]])),
            ("b".into(), tensor1(&[1i64, 2, 3])),
            ("c".into(), tensor1(&[f16::from_f32(0.5)])),
            ("d".into(), tensor1(&[true, false])),
            ("e".into(), tensor0(7u8)),
            ("f".into(), tensor1(&[-1i8, 5])),
            ("g".into(), tensor1(&[1.0f64])),
        ]);
    }

    #[test]
    fn truncated_npz_is_an_error() {
        let bytes = npz_bytes(&[("x".into(), tensor1(&[1.0f32; 100]))]).unwrap();
        let err = read_npz(Cursor::new(bytes[..bytes.len() / 2].to_vec())).unwrap_err();
        assert!(format!("{err:#}").contains("not a valid .npz"), "{err:#}");
    }

    #[test]
    fn fortran_order_is_transposed() {
        // numpy: np.asfortranarray(np.arange(6, dtype='<i4').reshape(2, 3))
        let header = "{'descr': '<i4', 'fortran_order': True, 'shape': (2, 3), }";
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        let pad = 64 - (10 + header.len() + 1) % 64;
        let hlen = header.len() + pad + 1;
        bytes.extend_from_slice(&(hlen as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(b' ', pad));
        bytes.push(b'\n');
        for v in [0i32, 3, 1, 4, 2, 5] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let t = read_npy(Cursor::new(bytes)).unwrap();
        assert_eq!(t, tensor2(&[[0i32, 1, 2], [3, 4, 5]]));
    }
}
