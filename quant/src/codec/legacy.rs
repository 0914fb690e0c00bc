//! Legacy block types (32 elements per block): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and IQ4_NL.
//!
//! Placeholder: the encoders are being written; nothing calls these yet.

use super::{BlockCodec, Grid};

pub struct Q4_0;

impl BlockCodec for Q4_0 {
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

pub struct Q4_1;

impl BlockCodec for Q4_1 {
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

pub struct Q5_0;

impl BlockCodec for Q5_0 {
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

pub struct Q5_1;

impl BlockCodec for Q5_1 {
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

pub struct Q8_0;

impl BlockCodec for Q8_0 {
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

pub struct Iq4Nl;

impl BlockCodec for Iq4Nl {
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
