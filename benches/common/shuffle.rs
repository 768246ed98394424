//! A fixed shuffle for benches that must not walk memory in allocation order: the same order
//! on every run (xorshift64 from a constant seed, Fisher–Yates), so runs compare.

/// `0..n` in a fixed shuffled order.
pub fn shuffled(n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    order
}
