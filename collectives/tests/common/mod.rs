//! Shared helpers for the collectives tests.
#![allow(dead_code)]

use devccl::{DType, ReduceOp};

/// Rank `r`'s exactly representable input of `count` elements.
pub fn input(dtype: DType, op: ReduceOp, r: usize, count: usize) -> Vec<u8> {
    devccl::check::input(dtype, op, r, 0, count)
}

/// World sizes the issue asks for.
pub const WORLDS: [usize; 11] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16];
