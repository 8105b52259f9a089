//! numpy's `.npy` file header (format version 1.0), so that `restore --to` writes an array
//! entry as a file `np.load` opens without the program: the magic `\x93NUMPY`, the version,
//! the header's length (u16 LE), and a Python dict literal giving the element type, the order
//! and the shape, padded with spaces to a multiple of 64 bytes and ended by a newline. The
//! array's bytes follow in C order.

/// The header of a `.npy` file holding a C-ordered array of `shape` whose elements have numpy
/// type string `descr` (e.g. `"<f8"`; checked by the manifest to be a plain one).
pub fn header(descr: &str, shape: &[u64]) -> Vec<u8> {
    let dims = match shape {
        [one] => format!("({one},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {dims}, }}");
    // Magic (6), version (2), header length (2), then the dict and its padding and newline.
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut out = Vec::with_capacity(10 + dict.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    // At most 32 dimensions of 20 digits: far below the 65535 bytes a 1.0 header holds.
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_aligned_and_say_type_order_and_shape() {
        let longest = format!("({})", vec![u64::MAX.to_string(); 32].join(", "));
        for (descr, shape, dims) in [
            ("<f8", vec![3, 4], "(3, 4)"),
            ("|u1", vec![5], "(5,)"),
            ("<c16", vec![], "()"),
            ("<i8", vec![u64::MAX; 32], longest.as_str()),
        ] {
            let h = header(descr, &shape);
            assert_eq!(h.len() % 64, 0, "{descr} {shape:?}");
            assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
            assert_eq!(usize::from(u16::from_le_bytes([h[8], h[9]])), h.len() - 10);
            assert_eq!(h.last(), Some(&b'\n'));
            let text = std::str::from_utf8(&h[10..]).unwrap();
            assert!(
                text.starts_with(&format!(
                    "{{'descr': '{descr}', 'fortran_order': False, 'shape': "
                )),
                "{text}"
            );
            assert!(text.contains(&format!("'shape': {dims}, }}")), "{text}");
        }
    }
}
