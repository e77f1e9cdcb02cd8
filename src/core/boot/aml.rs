//! A few ACPI Machine Language (AML) encoders, enough for the DSDT's sleep package, PCI
//! host bridge and pvpanic device (ACPI 6.4, chapter 20).

const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const NAME_OP: u8 = 0x08;
const BYTE_PREFIX: u8 = 0x0a;
const WORD_PREFIX: u8 = 0x0b;
const DWORD_PREFIX: u8 = 0x0c;
const QWORD_PREFIX: u8 = 0x0e;
const STRING_PREFIX: u8 = 0x0d;
const SCOPE_OP: u8 = 0x10;
const BUFFER_OP: u8 = 0x11;
const PACKAGE_OP: u8 = 0x12;
const EXT_OP_PREFIX: u8 = 0x5b;
const DEVICE_OP: u8 = 0x82;
const ROOT_CHAR: u8 = b'\\';

/// Encodes an integer with the shortest prefix that fits it.
pub fn integer(value: u64) -> Vec<u8> {
    match value {
        0 => vec![ZERO_OP],
        1 => vec![ONE_OP],
        v if v <= u64::from(u8::MAX) => vec![BYTE_PREFIX, v as u8],
        v if v <= u64::from(u16::MAX) => {
            let mut out = vec![WORD_PREFIX];
            out.extend_from_slice(&(v as u16).to_le_bytes());
            out
        }
        v if v <= u64::from(u32::MAX) => {
            let mut out = vec![DWORD_PREFIX];
            out.extend_from_slice(&(v as u32).to_le_bytes());
            out
        }
        v => {
            let mut out = vec![QWORD_PREFIX];
            out.extend_from_slice(&v.to_le_bytes());
            out
        }
    }
}

/// Encodes a compressed EISA ID such as `PNP0A03` as a DWord constant.
///
/// The three letters take 5 bits each and the four hex digits 4 bits each; the resulting
/// 32-bit value is stored big-endian.
///
/// # Panics
///
/// Panics if `id` is not three uppercase letters and four hex digits; callers pass
/// constants.
pub fn eisa_id(id: &str) -> Vec<u8> {
    let bytes = id.as_bytes();
    assert!(
        bytes.len() == 7 && bytes[..3].iter().all(u8::is_ascii_uppercase),
        "invalid EISA ID {id:?}"
    );
    let mut value: u32 = 0;
    for &letter in &bytes[..3] {
        value = (value << 5) | u32::from(letter - 0x40);
    }
    for &digit in &bytes[3..] {
        let nibble = (digit as char)
            .to_digit(16)
            .unwrap_or_else(|| panic!("invalid EISA ID {id:?}"));
        value = (value << 4) | nibble;
    }
    let mut out = vec![DWORD_PREFIX];
    out.extend_from_slice(&value.to_be_bytes());
    out
}

/// Encodes an ASCII string constant, such as a _HID that is not an EISA ID.
///
/// # Panics
///
/// Panics on non-ASCII text or a NUL byte; callers pass constants.
pub fn string(text: &str) -> Vec<u8> {
    assert!(
        text.is_ascii() && !text.contains('\0'),
        "invalid AML string {text:?}"
    );
    let mut out = vec![STRING_PREFIX];
    out.extend_from_slice(text.as_bytes());
    out.push(0);
    out
}

/// Encodes `Buffer() { bytes }`.
pub fn buffer(bytes: &[u8]) -> Vec<u8> {
    let mut body = integer(bytes.len() as u64);
    body.extend_from_slice(bytes);
    let mut out = vec![BUFFER_OP];
    out.extend_from_slice(&package_length(body.len()));
    out.extend_from_slice(&body);
    out
}

/// Encodes a resource template (for _CRS) with one fixed I/O port range:
/// `IO (Decode16, port, port, 1, len)` and the end tag, as ACPI's small resource items.
pub fn io_port_resources(port: u16, len: u8) -> Vec<u8> {
    let [low, high] = port.to_le_bytes();
    // I/O port descriptor: small item 0x08 with 7 bytes, 16-bit decode, minimum and maximum
    // base, alignment 1, length.
    let mut template = vec![0x47, 0x01, low, high, low, high, 0x01, len];
    // End tag: small item 0x0f with 1 byte; a checksum of 0 means the sum is not checked.
    template.extend_from_slice(&[0x79, 0x00]);
    buffer(&template)
}

/// Encodes `Name(name, value)`; `name` is a 4-character name segment.
pub fn name(name: &str, value: &[u8]) -> Vec<u8> {
    let mut out = vec![NAME_OP];
    out.extend_from_slice(&name_seg(name));
    out.extend_from_slice(value);
    out
}

/// Encodes `Package(n) { elements }` from already encoded elements.
pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![elements.len() as u8];
    for element in elements {
        body.extend_from_slice(element);
    }
    let mut out = vec![PACKAGE_OP];
    out.extend_from_slice(&package_length(body.len()));
    out.extend_from_slice(&body);
    out
}

/// Encodes `Scope(\name) { body }` for a scope directly under the root.
pub fn root_scope(name: &str, body: &[u8]) -> Vec<u8> {
    let mut inner = vec![ROOT_CHAR];
    inner.extend_from_slice(&name_seg(name));
    inner.extend_from_slice(body);
    let mut out = vec![SCOPE_OP];
    out.extend_from_slice(&package_length(inner.len()));
    out.extend_from_slice(&inner);
    out
}

/// Encodes `Device(name) { body }`.
pub fn device(name: &str, body: &[u8]) -> Vec<u8> {
    let mut inner = name_seg(name).to_vec();
    inner.extend_from_slice(body);
    let mut out = vec![EXT_OP_PREFIX, DEVICE_OP];
    out.extend_from_slice(&package_length(inner.len()));
    out.extend_from_slice(&inner);
    out
}

/// Pads a name such as `_S5` with underscores to the 4-byte name segment `_S5_`.
///
/// # Panics
///
/// Panics on names longer than 4 characters; callers pass constants.
fn name_seg(name: &str) -> [u8; 4] {
    assert!(name.len() <= 4, "AML name segment {name:?} is too long");
    let mut seg = [b'_'; 4];
    seg[..name.len()].copy_from_slice(name.as_bytes());
    seg
}

/// Encodes a PkgLength for `content_len` bytes of content. The encoded length counts the
/// PkgLength bytes themselves: one byte encodes up to 63, and each of up to three extra
/// bytes adds 8 bits above the 4 low bits kept in the lead byte.
fn package_length(content_len: usize) -> Vec<u8> {
    if content_len + 1 < 0x40 {
        return vec![(content_len + 1) as u8];
    }
    for extra in 1..=3usize {
        let total = content_len + 1 + extra;
        if total < 1 << (4 + 8 * extra) {
            let mut out = vec![((extra as u8) << 6) | (total & 0xf) as u8];
            for i in 0..extra {
                out.push((total >> (4 + 8 * i)) as u8);
            }
            return out;
        }
    }
    panic!("AML package of {content_len} bytes exceeds the 28-bit PkgLength");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_use_shortest_form() {
        assert_eq!(integer(0), vec![0x00]);
        assert_eq!(integer(1), vec![0x01]);
        assert_eq!(integer(5), vec![0x0a, 5]);
        assert_eq!(integer(0x1234), vec![0x0b, 0x34, 0x12]);
        assert_eq!(integer(0x1234_5678), vec![0x0c, 0x78, 0x56, 0x34, 0x12]);
        assert_eq!(integer(1 << 40)[0], 0x0e);
    }

    #[test]
    fn eisa_id_pci_host_bridge() {
        assert_eq!(eisa_id("PNP0A03"), vec![0x0c, 0x41, 0xd0, 0x0a, 0x03]);
    }

    #[test]
    fn sleep_package_bytes() {
        let s5 = name(
            "_S5",
            &package(&[integer(5), integer(5), integer(0), integer(0)]),
        );
        assert_eq!(
            s5,
            vec![
                0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 0x05, 0x0a, 0x05, 0x00, 0x00
            ]
        );
    }

    #[test]
    fn string_and_io_resources() {
        assert_eq!(string("AB"), [0x0d, b'A', b'B', 0]);
        assert_eq!(
            io_port_resources(0x505, 1),
            [0x11, 0x0d, 0x0a, 0x0a, 0x47, 0x01, 0x05, 0x05, 0x05, 0x05, 0x01, 0x01, 0x79, 0x00]
        );
    }

    #[test]
    fn package_length_forms() {
        assert_eq!(package_length(0x3e), vec![0x3f]);
        // 0x3f content bytes need two length bytes: total 0x41.
        assert_eq!(package_length(0x3f), vec![0x41, 0x04]);
        assert_eq!(package_length(0xffd), vec![0x4f, 0xff]);
        // 0xffe content bytes: total 0x1001 needs three length bytes.
        assert_eq!(package_length(0xffe), vec![0x81, 0x00, 0x01]);
    }

    #[test]
    fn device_in_scope() {
        let dev = device("PCI0", &name("_UID", &integer(0)));
        assert_eq!(&dev[..3], &[0x5b, 0x82, 0x0b]);
        assert_eq!(&dev[3..7], b"PCI0");
        let scope = root_scope("_SB", &dev);
        assert_eq!(scope[0], 0x10);
        assert_eq!(usize::from(scope[1]), scope.len() - 1);
        assert_eq!(&scope[2..7], b"\\_SB_");
    }
}
