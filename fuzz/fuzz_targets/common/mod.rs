//! Helpers shared by the targets (each target is its own crate and includes this module).

/// Splits `input` into the payload and the pieces it arrives in, as a peer's bytes arrive in
/// reads of any size. The input's first byte chooses how:
///
/// * its low 3 bits `k` < 7: `k` cuts, each at `byte * (len + 1) / 256` of the payload for the
///   `k` bytes that follow (sorted, so every piece is contiguous; equal cuts give empty pieces,
///   which a decoder must take in its stride too);
/// * `k` == 7: one byte per piece, the slowest peer possible.
///
/// The rest of the first byte is left to the target (`flags >> 3`). Returns `None` when the
/// input is too short to say.
pub fn pieces(input: &[u8]) -> Option<(u8, &[u8], Vec<&[u8]>)> {
    let (&first, rest) = input.split_first()?;
    let k = usize::from(first & 7);
    let flags = first >> 3;
    if k == 7 {
        return Some((flags, rest, rest.chunks(1).collect()));
    }
    let cut_bytes = rest.get(..k)?;
    let payload = rest.get(k..)?;
    let len = payload.len();
    let mut cuts: Vec<usize> = cut_bytes
        .iter()
        .map(|&b| usize::from(b) * (len + 1) / 256)
        .collect();
    cuts.sort_unstable();
    let mut out = Vec::with_capacity(k + 1);
    let mut at = 0;
    for cut in cuts {
        out.push(&payload[at..cut]);
        at = cut;
    }
    out.push(&payload[at..]);
    Some((flags, payload, out))
}
