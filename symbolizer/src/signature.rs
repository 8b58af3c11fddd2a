//! Function signatures from DWARF, and whether two are call-compatible.
//!
//! Hot-patching a function with one of another signature is the classic way
//! to corrupt a process: arguments land in the wrong registers, a float is
//! read from an integer register, a struct returned in memory is expected
//! in `rax`. An ELF symbol table cannot tell; DWARF can. [`Signature`]
//! describes a function's parameters and return value as their ABI sees
//! them (class and size, names for the message), and
//! [`Signature::abi_mismatches`] lists every difference that changes how
//! the System V x86-64 ABI passes them. Type *names* may differ (`u64` in
//! a Rust plugin, `uint64_t` in C): that is not a mismatch.

use gimli::{AttributeValue, DwTag, Reader, UnitOffset, constants};

/// How the ABI passes a value (System V x86-64, coarse).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AbiClass {
    /// General-purpose register: integers, `bool`, `char`, enums, pointers
    /// and references.
    Integer,
    /// SSE register: `f32`, `f64`.
    Float,
    /// Structs, unions, arrays: classified field by field by the ABI; we
    /// compare them by size (and report the names).
    Aggregate,
    /// Anything DWARF describes that we do not classify.
    Unknown,
}

/// One parameter or return value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ValueType {
    /// The type's name as DWARF spells it (after typedefs), `*T` for
    /// pointers, `?` when unnamed.
    pub name: String,
    /// Its size in bytes, when DWARF gives one.
    pub size: Option<u64>,
    /// How the ABI passes it.
    pub class: AbiClass,
}

impl std::fmt::Display for ValueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let class = match self.class {
            AbiClass::Integer => "integer",
            AbiClass::Float => "float",
            AbiClass::Aggregate => "aggregate",
            AbiClass::Unknown => "unclassified",
        };
        match self.size {
            Some(s) => write!(f, "`{}` ({class}, {s} bytes)", self.name),
            None => write!(f, "`{}` ({class})", self.name),
        }
    }
}

/// A function's parameters and return value, from its DWARF subprogram.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Signature {
    /// The subprogram's name.
    pub name: Option<String>,
    /// Parameters in order (artificial ones, like C++ `this`, included:
    /// they are passed like any other).
    pub params: Vec<ValueType>,
    /// The return value; `None` for `void` / `()`.
    pub ret: Option<ValueType>,
    /// Takes `...`.
    pub variadic: bool,
}

impl std::fmt::Display for Signature {
    /// `fn name(u64, *u8) -> u32`, types as DWARF names them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fn {}(", self.name.as_deref().unwrap_or("?"))?;
        for (i, p) in self.params.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(&p.name)?;
        }
        if self.variadic {
            f.write_str(if self.params.is_empty() {
                "..."
            } else {
                ", ..."
            })?;
        }
        f.write_str(")")?;
        if let Some(r) = &self.ret {
            write!(f, " -> {}", r.name)?;
        }
        Ok(())
    }
}

impl Signature {
    /// Every difference between `self` (the function being replaced) and
    /// `other` (its replacement) that changes how arguments or the result
    /// are passed; empty when a call to one is a valid call to the other.
    pub fn abi_mismatches(&self, other: &Signature) -> Vec<String> {
        let mut out = Vec::new();
        if self.params.len() != other.params.len() {
            out.push(format!(
                "the target takes {} parameter(s), the replacement {}",
                self.params.len(),
                other.params.len()
            ));
        }
        for (i, (a, b)) in self.params.iter().zip(&other.params).enumerate() {
            if let Some(why) = differs(a, b) {
                out.push(format!(
                    "parameter {}: target {a}, replacement {b} ({why})",
                    i + 1
                ));
            }
        }
        let unknown =
            |r: &Option<ValueType>| r.as_ref().is_some_and(|v| v.class == AbiClass::Unknown);
        match (&self.ret, &other.ret) {
            (None, None) => {}
            _ if unknown(&self.ret) || unknown(&other.ret) => {}
            (Some(a), Some(b)) => {
                if let Some(why) = differs(a, b) {
                    out.push(format!("return value: target {a}, replacement {b} ({why})"));
                }
            }
            (Some(a), None) => out.push(format!(
                "return value: the target returns {a}, the replacement returns nothing"
            )),
            (None, Some(b)) => out.push(format!(
                "return value: the target returns nothing, the replacement returns {b}"
            )),
        }
        if self.variadic != other.variadic {
            out.push(format!(
                "the target is {}variadic, the replacement {}",
                if self.variadic { "" } else { "not " },
                if other.variadic { "is" } else { "is not" }
            ));
        }
        out
    }
}

fn differs(a: &ValueType, b: &ValueType) -> Option<&'static str> {
    if a.class == AbiClass::Unknown || b.class == AbiClass::Unknown {
        return None; // nothing to compare honestly
    }
    if a.class != b.class {
        return Some("passed in different registers");
    }
    match (a.size, b.size) {
        (Some(x), Some(y)) if x != y => Some("different sizes"),
        _ => None,
    }
}

/// Reads the signature of the subprogram whose entry is `addr` (a file
/// virtual address) in `unit`, if the unit has one.
pub(crate) fn read<R: Reader>(
    unit: gimli::UnitRef<'_, R>,
    addr: u64,
) -> gimli::Result<Option<Signature>> {
    let mut entries = unit.entries();
    let mut found: Option<UnitOffset<R::Offset>> = None;
    while let Some((_, die)) = entries.next_dfs()? {
        if die.tag() != constants::DW_TAG_subprogram {
            continue;
        }
        let low = match die.attr_value(constants::DW_AT_low_pc)? {
            Some(AttributeValue::Addr(a)) => Some(a),
            Some(AttributeValue::DebugAddrIndex(i)) => Some(unit.address(i)?),
            _ => None,
        };
        if low == Some(addr) {
            found = Some(die.offset());
            break;
        }
    }
    let Some(offset) = found else {
        return Ok(None);
    };
    // The definition, then what it refines: its declaration
    // (`DW_AT_specification`: methods keep their result type there) or the
    // abstract instance it is a concrete copy of (`DW_AT_abstract_origin`).
    let mut chain = vec![offset];
    while chain.len() < 4 {
        let die = unit.entry(*chain.last().unwrap_or(&offset))?;
        let next = match die.attr_value(constants::DW_AT_specification)? {
            Some(v) => Some(v),
            None => die.attr_value(constants::DW_AT_abstract_origin)?,
        };
        match next {
            None => break,
            Some(AttributeValue::UnitRef(o)) => chain.push(o),
            // In another unit (LTO, split DWARF): we would describe it
            // partly, and a partial signature is a wrong one. Not checked.
            Some(_) => return Ok(None),
        }
    }
    let mut name = None;
    let mut ret = None;
    let mut params = Vec::new();
    let mut variadic = false;
    for &o in &chain {
        let die = unit.entry(o)?;
        if name.is_none() {
            name = name_of(unit, &die)?;
        }
        if ret.is_none() {
            match die.attr_value(constants::DW_AT_type)? {
                Some(AttributeValue::UnitRef(t)) => ret = describe(unit, t, 0)?,
                Some(_) => return Ok(None), // a type in another unit
                None => {}
            }
        }
        // The fullest parameter list along the chain (a definition may list
        // only some, e.g. none for optimized-out ones).
        let (p, v) = parameters(unit, o)?;
        if p.len() > params.len() {
            params = p;
        }
        variadic |= v;
    }
    Ok(Some(Signature {
        name,
        params,
        ret,
        variadic,
    }))
}

/// The formal parameters among the children of the DIE at `offset`, in
/// order, and whether it takes `...`.
fn parameters<R: Reader>(
    unit: gimli::UnitRef<'_, R>,
    offset: UnitOffset<R::Offset>,
) -> gimli::Result<(Vec<ValueType>, bool)> {
    let mut params = Vec::new();
    let mut variadic = false;
    let mut tree = unit.entries_tree(Some(offset))?;
    let root = tree.root()?;
    let mut children = root.children();
    while let Some(child) = children.next()? {
        let e = child.entry();
        match e.tag() {
            constants::DW_TAG_formal_parameter => {
                let t = match die_type(unit, e)? {
                    Some(t) => describe(unit, t, 0)?,
                    None => None,
                };
                params.push(t.unwrap_or(ValueType {
                    name: "?".into(),
                    size: None,
                    class: AbiClass::Unknown,
                }));
            }
            constants::DW_TAG_unspecified_parameters => variadic = true,
            _ => {}
        }
    }
    Ok((params, variadic))
}

fn name_of<R: Reader>(
    unit: gimli::UnitRef<'_, R>,
    die: &gimli::DebuggingInformationEntry<'_, '_, R>,
) -> gimli::Result<Option<String>> {
    Ok(match die.attr_value(constants::DW_AT_name)? {
        Some(v) => Some(unit.attr_string(v)?.to_string_lossy()?.into_owned()),
        None => None,
    })
}

/// The DIE's `DW_AT_type` (following an abstract origin for parameters of
/// concrete copies).
fn die_type<R: Reader>(
    unit: gimli::UnitRef<'_, R>,
    die: &gimli::DebuggingInformationEntry<'_, '_, R>,
) -> gimli::Result<Option<UnitOffset<R::Offset>>> {
    match die.attr_value(constants::DW_AT_type)? {
        Some(AttributeValue::UnitRef(o)) => Ok(Some(o)),
        Some(_) => Ok(None), // cross-unit references: not classified
        None => match die.attr_value(constants::DW_AT_abstract_origin)? {
            Some(AttributeValue::UnitRef(o)) => {
                let origin = unit.entry(o)?;
                match origin.attr_value(constants::DW_AT_type)? {
                    Some(AttributeValue::UnitRef(t)) => Ok(Some(t)),
                    _ => Ok(None),
                }
            }
            _ => Ok(None),
        },
    }
}

/// Describes the type at `offset`, through typedefs and qualifiers.
fn describe<R: Reader>(
    unit: gimli::UnitRef<'_, R>,
    offset: UnitOffset<R::Offset>,
    depth: u32,
) -> gimli::Result<Option<ValueType>> {
    if depth > 16 {
        return Ok(None); // a typedef cycle in corrupt DWARF
    }
    let die = unit.entry(offset)?;
    let tag: DwTag = die.tag();
    let name = name_of(unit, &die)?;
    let size = match die.attr_value(constants::DW_AT_byte_size)? {
        Some(v) => v.udata_value(),
        None => None,
    };
    let class = match tag {
        constants::DW_TAG_typedef
        | constants::DW_TAG_const_type
        | constants::DW_TAG_volatile_type
        | constants::DW_TAG_restrict_type
        | constants::DW_TAG_atomic_type => {
            return match die_type(unit, &die)? {
                Some(t) => {
                    let mut v = describe(unit, t, depth + 1)?;
                    if let (Some(v), Some(n), constants::DW_TAG_typedef) = (&mut v, &name, tag) {
                        v.name = n.clone();
                    }
                    Ok(v)
                }
                None => Ok(None),
            };
        }
        constants::DW_TAG_pointer_type
        | constants::DW_TAG_reference_type
        | constants::DW_TAG_rvalue_reference_type
        | constants::DW_TAG_ptr_to_member_type => {
            let pointee = match die_type(unit, &die)? {
                Some(t) => name_of(unit, &unit.entry(t)?)?,
                None => Some("void".to_owned()),
            };
            let shown = name.unwrap_or_else(|| format!("*{}", pointee.as_deref().unwrap_or("?")));
            return Ok(Some(ValueType {
                name: shown,
                size: size.or(Some(8)),
                class: AbiClass::Integer,
            }));
        }
        constants::DW_TAG_base_type => match die.attr_value(constants::DW_AT_encoding)? {
            Some(AttributeValue::Encoding(e)) => match e {
                constants::DW_ATE_float => AbiClass::Float,
                constants::DW_ATE_signed
                | constants::DW_ATE_unsigned
                | constants::DW_ATE_boolean
                | constants::DW_ATE_signed_char
                | constants::DW_ATE_unsigned_char
                | constants::DW_ATE_UTF
                | constants::DW_ATE_address => AbiClass::Integer,
                _ => AbiClass::Unknown,
            },
            _ => AbiClass::Unknown,
        },
        constants::DW_TAG_enumeration_type => AbiClass::Integer,
        constants::DW_TAG_structure_type
        | constants::DW_TAG_union_type
        | constants::DW_TAG_class_type
        | constants::DW_TAG_array_type => AbiClass::Aggregate,
        _ => AbiClass::Unknown,
    };
    Ok(Some(ValueType {
        name: name.unwrap_or_else(|| "?".to_owned()),
        size,
        class,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(name: &str, size: u64, class: AbiClass) -> ValueType {
        ValueType {
            name: name.into(),
            size: Some(size),
            class,
        }
    }

    fn sig(params: Vec<ValueType>, ret: Option<ValueType>) -> Signature {
        Signature {
            name: None,
            params,
            ret,
            variadic: false,
        }
    }

    #[test]
    fn names_may_differ_classes_and_sizes_may_not() {
        let rust = sig(
            vec![v("u64", 8, AbiClass::Integer)],
            Some(v("u64", 8, AbiClass::Integer)),
        );
        let c = sig(
            vec![v("uint64_t", 8, AbiClass::Integer)],
            Some(v("unsigned long", 8, AbiClass::Integer)),
        );
        assert!(rust.abi_mismatches(&c).is_empty());

        let float = sig(
            vec![v("f64", 8, AbiClass::Float)],
            Some(v("u64", 8, AbiClass::Integer)),
        );
        let m = rust.abi_mismatches(&float);
        assert_eq!(m.len(), 1, "{m:?}");
        assert!(m[0].starts_with("parameter 1:"), "{m:?}");
        assert!(m[0].contains("different registers"), "{m:?}");

        let narrow = sig(
            vec![v("u64", 8, AbiClass::Integer)],
            Some(v("u32", 4, AbiClass::Integer)),
        );
        let m = rust.abi_mismatches(&narrow);
        assert_eq!(m.len(), 1);
        assert!(
            m[0].starts_with("return value:") && m[0].contains("sizes"),
            "{m:?}"
        );

        let two = sig(
            vec![
                v("u64", 8, AbiClass::Integer),
                v("u64", 8, AbiClass::Integer),
            ],
            Some(v("u64", 8, AbiClass::Integer)),
        );
        assert!(rust.abi_mismatches(&two)[0].contains("takes 1 parameter(s), the replacement 2"));

        let void = sig(vec![v("u64", 8, AbiClass::Integer)], None);
        assert!(rust.abi_mismatches(&void)[0].contains("returns nothing"));
        assert_eq!(rust.to_string(), "fn ?(u64) -> u64");
        assert_eq!(two.to_string(), "fn ?(u64, u64) -> u64");
    }
}
