//! K-quants (256-element super-blocks): Q2_K, Q3_K, Q4_K, Q5_K and Q6_K.
//!
//! Placeholder: the encoders are being written; nothing calls these yet.

use super::{BlockCodec, Grid};

pub struct Q2K;

impl BlockCodec for Q2K {
    const BLOCK: usize = 0;
    const BYTES: usize = 0;

    fn quantize_row(_x: &[f32], _importance: Option<&[f32]>, _out: &mut [u8]) {
        unimplemented!()
    }

    fn grid(_block: &[u8], _i: usize) -> Grid {
        unimplemented!()
    }

    fn set_quant(_block: &mut [u8], _i: usize, _q: i32) {
        unimplemented!()
    }
}

pub struct Q3K;

impl BlockCodec for Q3K {
    const BLOCK: usize = 0;
    const BYTES: usize = 0;

    fn quantize_row(_x: &[f32], _importance: Option<&[f32]>, _out: &mut [u8]) {
        unimplemented!()
    }

    fn grid(_block: &[u8], _i: usize) -> Grid {
        unimplemented!()
    }

    fn set_quant(_block: &mut [u8], _i: usize, _q: i32) {
        unimplemented!()
    }
}

pub struct Q4K;

impl BlockCodec for Q4K {
    const BLOCK: usize = 0;
    const BYTES: usize = 0;

    fn quantize_row(_x: &[f32], _importance: Option<&[f32]>, _out: &mut [u8]) {
        unimplemented!()
    }

    fn grid(_block: &[u8], _i: usize) -> Grid {
        unimplemented!()
    }

    fn set_quant(_block: &mut [u8], _i: usize, _q: i32) {
        unimplemented!()
    }
}

pub struct Q5K;

impl BlockCodec for Q5K {
    const BLOCK: usize = 0;
    const BYTES: usize = 0;

    fn quantize_row(_x: &[f32], _importance: Option<&[f32]>, _out: &mut [u8]) {
        unimplemented!()
    }

    fn grid(_block: &[u8], _i: usize) -> Grid {
        unimplemented!()
    }

    fn set_quant(_block: &mut [u8], _i: usize, _q: i32) {
        unimplemented!()
    }
}

pub struct Q6K;

impl BlockCodec for Q6K {
    const BLOCK: usize = 0;
    const BYTES: usize = 0;

    fn quantize_row(_x: &[f32], _importance: Option<&[f32]>, _out: &mut [u8]) {
        unimplemented!()
    }

    fn grid(_block: &[u8], _i: usize) -> Grid {
        unimplemented!()
    }

    fn set_quant(_block: &mut [u8], _i: usize, _q: i32) {
        unimplemented!()
    }
}
