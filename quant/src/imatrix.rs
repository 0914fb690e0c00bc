//! Placeholder until the importance-matrix reader lands.
use std::collections::BTreeMap;
#[derive(Clone, Debug, Default)]
pub struct ImatrixEntry { pub sum_sq: Vec<f32>, pub count: u64 }
#[derive(Clone, Debug, Default)]
pub struct Imatrix { pub entries: BTreeMap<String, ImatrixEntry>, pub datasets: Vec<String>, pub chunk_count: u32, pub chunk_size: u32 }
impl Imatrix {
    pub fn read(_p: &std::path::Path) -> Result<Imatrix, crate::QuantError> { Err(crate::QuantError::Data("x".into())) }
    pub fn write(&self, _p: &std::path::Path) -> Result<(), crate::QuantError> { Ok(()) }
}
