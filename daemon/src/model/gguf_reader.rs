//! The GGUF header reader: a bounds-checked cursor that never reads past the buffer and caps
//! every count by the bytes left, so a damaged file is an error naming where it broke.

use super::gguf::{
    GgmlType, GgufError, GgufValue, MAX_ARRAY_DEPTH, MAX_DIMS, TensorInfo, type_name,
};

type Result<T> = std::result::Result<T, GgufError>;

/// A bounds-checked cursor over the header.
pub(crate) struct Reader<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn malformed(&self, what: &str, problem: String) -> GgufError {
        GgufError::Malformed {
            offset: self.pos,
            what: what.into(),
            problem,
        }
    }
    pub(crate) fn left(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub(crate) fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.left() {
            return Err(self.malformed(
                what,
                format!(
                    "needs {n} bytes, only {} left (truncated file?)",
                    self.left()
                ),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub(crate) fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    pub(crate) fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }
    pub(crate) fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }
    /// A `u64` count of items that each take at least `min_size` bytes, capped by the bytes left.
    pub(crate) fn count(&mut self, what: &str, min_size: usize) -> Result<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        if n > (self.left() / min_size.max(1)) as u64 {
            return Err(GgufError::Malformed {
                offset: at,
                what: what.into(),
                problem: format!(
                    "count {n} cannot fit in the {} bytes left (truncated file?)",
                    self.left()
                ),
            });
        }
        Ok(n as usize)
    }
    pub(crate) fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what, 1)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| self.malformed(what, format!("string is not valid UTF-8: {e}")))
    }

    pub(crate) fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(what)?[0]),
            1 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            2 => GgufValue::U16(self.array(what).map(u16::from_le_bytes)?),
            3 => GgufValue::I16(self.array(what).map(i16::from_le_bytes)?),
            4 => GgufValue::U32(self.u32(what)?),
            5 => GgufValue::I32(self.array(what).map(i32::from_le_bytes)?),
            6 => GgufValue::F32(self.array(what).map(f32::from_le_bytes)?),
            7 => match self.array::<1>(what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.malformed(what, format!("bool byte {b} is not 0 or 1"))),
            },
            8 => GgufValue::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.malformed(what, "arrays nested too deeply".into()));
                }
                let elem = self.u32(what)?;
                let min_size = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => {
                        return Err(self.malformed(what, format!("unknown array element type {t}")));
                    }
                };
                let n = self.count(what, min_size)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(elem, what, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(self.array(what).map(i64::from_le_bytes)?),
            12 => GgufValue::F64(self.array(what).map(f64::from_le_bytes)?),
            t => return Err(self.malformed(what, format!("unknown value type {t}"))),
        })
    }

    pub(crate) fn tensor_info(&mut self, i: usize, alignment: usize) -> Result<TensorInfo> {
        let name = self.string(&format!("name of tensor #{i}"))?;
        let what = format!("info of tensor `{name}`");
        let bad = |problem: String| GgufError::BadTensor {
            name: name.clone(),
            problem,
        };
        let n_dims = self.u32(&what)? as usize;
        if !(1..=MAX_DIMS).contains(&n_dims) {
            return Err(bad(format!(
                "{n_dims} dimensions (ggml allows 1 to {MAX_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let d = self.u64(&what)?;
            dims.push(usize::try_from(d).map_err(|_| bad(format!("dimension {d} too large")))?);
        }
        let type_id = self.u32(&what)?;
        let offset = self.u64(&what)?;
        let ggml_type =
            GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnsupportedTensorType {
                name: name.clone(),
                type_id,
                type_name: type_name(type_id).into(),
            })?;
        let n_elements = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("dims {dims:?} overflow")))?;
        let bs = ggml_type.block_size();
        if dims[0] % bs != 0 {
            return Err(bad(format!(
                "ne0 = {} is not a whole number of {} blocks ({bs} elements each)",
                dims[0],
                ggml_type.name()
            )));
        }
        let n_bytes = (n_elements / bs)
            .checked_mul(ggml_type.block_bytes())
            .ok_or_else(|| bad(format!("dims {dims:?} overflow")))?;
        let offset = usize::try_from(offset)
            .ok()
            .filter(|o| o % alignment == 0)
            .ok_or_else(|| {
                bad(format!(
                    "data offset {offset} is not a multiple of the alignment {alignment}"
                ))
            })?;
        Ok(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            n_elements,
            n_bytes,
        })
    }
}
