//! Kernel module dependencies, read from each module's `.modinfo` ELF section (the
//! `depends=` string that `depmod` also reads), so that no `depmod` has to run on the host.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// Largest module file read, in bytes; the biggest Debian 6.1 module is about 10 MiB.
const MAX_MODULE_SIZE: u64 = 64 << 20;

/// Why a module file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("failed to read kernel module {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel module {path} is not a valid ELF64 module: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("kernel module {path} is {size} bytes, over the {MAX_MODULE_SIZE}-byte limit")]
    TooLarge { path: PathBuf, size: u64 },
}

/// A module file found under `/lib/modules/<version>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Name as `modprobe` takes it: the file stem with `-` replaced by `_`.
    pub name: String,
    /// Path relative to `/lib/modules/<version>`, as in `kernel/drivers/virtio/virtio.ko`.
    pub relative_path: PathBuf,
    /// Names of the modules it needs, from `depends=`.
    pub depends: Vec<String>,
}

/// Returns the value of `key=` in the `.modinfo` section of the ELF64 module `bytes`.
pub fn modinfo_value<'a>(bytes: &'a [u8], key: &str) -> Result<Option<&'a str>, String> {
    let section = modinfo_section(bytes)?;
    let prefix = format!("{key}=");
    Ok(section
        .split(|&b| b == 0)
        .filter_map(|entry| std::str::from_utf8(entry).ok())
        .find_map(|entry| entry.strip_prefix(prefix.as_str())))
}

/// Finds the `.modinfo` section through the section header table.
fn modinfo_section(bytes: &[u8]) -> Result<&[u8], String> {
    let read = |offset: usize, len: usize| -> Result<u64, String> {
        let field = offset
            .checked_add(len)
            .and_then(|end| bytes.get(offset..end))
            .ok_or_else(|| format!("offset {offset:#x} is past the end of the file"))?;
        let mut value = [0u8; 8];
        value[..len].copy_from_slice(field);
        Ok(u64::from_le_bytes(value))
    };
    if !bytes.starts_with(b"\x7fELF") || bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return Err("not a little-endian ELF64 file".to_string());
    }
    let section_headers = read(0x28, 8)? as usize;
    let header_size = read(0x3a, 2)? as usize;
    let count = read(0x3c, 2)? as usize;
    let names_index = read(0x3e, 2)? as usize;
    if header_size != 64 || names_index >= count {
        return Err(format!(
            "section header size {header_size} or name table index {names_index} is invalid"
        ));
    }
    let section = |index: usize| -> Result<(u64, usize, usize), String> {
        let base = section_headers
            .checked_add(index * 64)
            .ok_or_else(|| "section header table overflows".to_string())?;
        Ok((
            read(base, 4)?,
            read(base + 24, 8)? as usize,
            read(base + 32, 8)? as usize,
        ))
    };
    let slice = |offset: usize, size: usize| {
        offset
            .checked_add(size)
            .and_then(|end| bytes.get(offset..end))
            .ok_or_else(|| format!("section at {offset:#x} of {size} bytes is past the end"))
    };

    let (_, names_offset, names_size) = section(names_index)?;
    let names = slice(names_offset, names_size)?;
    for index in 0..count {
        let (name_offset, offset, size) = section(index)?;
        let name = names
            .get(name_offset as usize..)
            .and_then(|tail| tail.split(|&b| b == 0).next())
            .unwrap_or_default();
        if name == b".modinfo" {
            return slice(offset, size);
        }
    }
    Err("no .modinfo section".to_string())
}

/// Returns the module name for a file name such as `virtio_pci.ko` or `nd-virtio.ko`.
fn module_name(file_name: &str) -> Option<String> {
    let stem = file_name.strip_suffix(".ko")?;
    Some(stem.replace('-', "_"))
}

/// Lists every `.ko` file below `root` (a `/lib/modules/<version>` folder), keyed by name.
pub fn index_modules(root: &Path) -> Result<BTreeMap<String, PathBuf>, ModuleError> {
    let mut index = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let read_error = |source| ModuleError::Read {
            path: dir.clone(),
            source,
        };
        for entry in std::fs::read_dir(&dir).map_err(read_error)? {
            let entry = entry.map_err(read_error)?;
            let path = entry.path();
            let file_type = entry.file_type().map_err(read_error)?;
            if file_type.is_dir() {
                pending.push(path);
            } else if let Some(name) = entry.file_name().to_str().and_then(module_name) {
                let relative = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                index.insert(name, relative);
            }
        }
    }
    Ok(index)
}

/// Reads one module's dependencies.
pub fn read_module(root: &Path, name: &str, relative_path: &Path) -> Result<Module, ModuleError> {
    let path = root.join(relative_path);
    let read_error = |source| ModuleError::Read {
        path: path.clone(),
        source,
    };
    let size = std::fs::metadata(&path).map_err(read_error)?.len();
    if size > MAX_MODULE_SIZE {
        return Err(ModuleError::TooLarge { path, size });
    }
    let bytes = std::fs::read(&path).map_err(read_error)?;
    let depends = modinfo_value(&bytes, "depends")
        .map_err(|reason| ModuleError::Invalid {
            path: path.clone(),
            reason,
        })?
        .unwrap_or_default()
        .split(',')
        .filter(|dep| !dep.is_empty())
        .map(|dep| dep.replace('-', "_"))
        .collect();
    Ok(Module {
        name: name.to_string(),
        relative_path: relative_path.to_path_buf(),
        depends,
    })
}

/// Returns `wanted` and everything they depend on, dependencies first, so that loading
/// them in order with `insmod` succeeds. Wanted modules that do not exist are returned in
/// the second list; a dependency that does not exist is assumed to be built in.
pub fn resolve(
    root: &Path,
    index: &BTreeMap<String, PathBuf>,
    wanted: &[&str],
) -> Result<(Vec<Module>, Vec<String>), ModuleError> {
    let mut ordered = Vec::new();
    let mut visited = HashSet::new();
    let mut missing = Vec::new();
    for &name in wanted {
        if !index.contains_key(name) {
            missing.push(name.to_string());
            continue;
        }
        visit(root, index, name, &mut visited, &mut ordered)?;
    }
    Ok((ordered, missing))
}

fn visit(
    root: &Path,
    index: &BTreeMap<String, PathBuf>,
    name: &str,
    visited: &mut HashSet<String>,
    ordered: &mut Vec<Module>,
) -> Result<(), ModuleError> {
    // Marking before recursing also stops a dependency cycle, which depmod would reject.
    if !visited.insert(name.to_string()) {
        return Ok(());
    }
    let Some(relative) = index.get(name) else {
        return Ok(());
    };
    let module = read_module(root, name, relative)?;
    for dep in &module.depends {
        visit(root, index, dep, visited, ordered)?;
    }
    ordered.push(module);
    Ok(())
}

/// Formats `modules.dep` lines for `modules`: each module, a colon, and its dependencies
/// (all transitive ones, nearest first), as `modprobe` reads them.
pub fn modules_dep(modules: &[Module]) -> String {
    let by_name: BTreeMap<&str, &Module> = modules.iter().map(|m| (m.name.as_str(), m)).collect();
    let mut text = String::new();
    for module in modules {
        let mut closure = Vec::new();
        let mut stack: Vec<&str> = module.depends.iter().map(String::as_str).collect();
        let mut seen = HashSet::new();
        while let Some(dep) = stack.pop() {
            if let Some(found) = by_name.get(dep) {
                if seen.insert(dep) {
                    closure.push(found.relative_path.display().to_string());
                    stack.extend(found.depends.iter().map(String::as_str));
                }
            }
        }
        text.push_str(&format!(
            "{}:{}{}\n",
            module.relative_path.display(),
            if closure.is_empty() { "" } else { " " },
            closure.join(" ")
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds an ELF64 file with a section name table and a `.modinfo` section.
    fn fake_module(modinfo: &str) -> Vec<u8> {
        let names = b"\0.shstrtab\0.modinfo\0";
        let mut bytes = vec![0u8; 64];
        bytes[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let names_offset = bytes.len();
        bytes.extend_from_slice(names);
        let info_offset = bytes.len();
        bytes.extend_from_slice(modinfo.as_bytes());
        let headers = bytes.len().next_multiple_of(8);
        bytes.resize(headers, 0);
        for (name, offset, size) in [
            (0u32, 0usize, 0usize),
            (1, names_offset, names.len()),
            (11, info_offset, modinfo.len()),
        ] {
            let mut header = [0u8; 64];
            header[..4].copy_from_slice(&name.to_le_bytes());
            header[24..32].copy_from_slice(&(offset as u64).to_le_bytes());
            header[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            bytes.extend_from_slice(&header);
        }
        bytes[0x28..0x30].copy_from_slice(&(headers as u64).to_le_bytes());
        bytes[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        bytes[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        bytes[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        bytes
    }

    #[test]
    fn modinfo_values_are_found() {
        let module = fake_module("license=GPL\0depends=virtio,virtio_ring\0name=virtio_pci\0");
        assert_eq!(
            modinfo_value(&module, "depends").unwrap(),
            Some("virtio,virtio_ring")
        );
        assert_eq!(modinfo_value(&module, "name").unwrap(), Some("virtio_pci"));
        assert_eq!(modinfo_value(&module, "alias").unwrap(), None);
    }

    #[test]
    fn malformed_modules_are_rejected() {
        assert!(modinfo_value(b"not elf", "depends").is_err());
        let mut module = fake_module("depends=\0");
        module[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(modinfo_value(&module, "depends").is_err());
        let mut module = fake_module("depends=\0");
        let len = module.len();
        module.truncate(len - 40);
        assert!(modinfo_value(&module, "depends").is_err());
    }

    #[test]
    fn dependencies_come_first() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("kernel/virtio")).unwrap();
        for (file, depends) in [
            ("virtio.ko", ""),
            ("virtio_ring.ko", ""),
            ("virtio_pci.ko", "virtio,virtio_ring"),
            ("virtio_blk.ko", "virtio,virtio_ring"),
            ("net-failover.ko", ""),
            ("virtio_net.ko", "net_failover,virtio_ring,virtio"),
        ] {
            let modinfo = format!("depends={depends}\0");
            std::fs::write(root.join("kernel/virtio").join(file), fake_module(&modinfo)).unwrap();
        }

        let index = index_modules(root).unwrap();
        assert_eq!(index.len(), 6);
        assert!(index.contains_key("net_failover"));
        let (modules, missing) = resolve(
            root,
            &index,
            &["virtio_pci", "virtio_blk", "virtio_net", "nope"],
        )
        .unwrap();
        assert_eq!(missing, ["nope"]);
        let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "virtio",
                "virtio_ring",
                "virtio_pci",
                "virtio_blk",
                "net_failover",
                "virtio_net"
            ]
        );

        let dep = modules_dep(&modules);
        assert!(dep.contains("kernel/virtio/virtio.ko:\n"), "{dep}");
        let pci_line = dep
            .lines()
            .find(|l| l.starts_with("kernel/virtio/virtio_pci.ko:"))
            .unwrap();
        assert!(pci_line.contains("kernel/virtio/virtio.ko"), "{pci_line}");
        assert!(
            pci_line.contains("kernel/virtio/virtio_ring.ko"),
            "{pci_line}"
        );
    }
}
