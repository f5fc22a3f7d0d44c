//! Builds the XDP object through the Makefile's rule (the clang flags live there
//! only) and generates the libbpf-rs skeleton from it.

use std::env;
use std::path::PathBuf;
use std::process::Command;

use std::sync::{Arc, Mutex};

use bindgen::callbacks::{EnumVariantValue, ParseCallbacks};
use libbpf_cargo::SkeletonBuilder;

/// BPF programs under src/bpf/NAME.bpf.c: each is built to OUT_DIR/NAME.o
/// and gets a skeleton OUT_DIR/NAME.skel.rs and the variable NAME_OBJECT
/// (upper case) holding the object's path, for tests and tools.
const BPF_PROGRAMS: &[&str] = &["l4lb_xdp", "l4lb_bench", "l4lb_decap", "l4lb_probe"];

/// The balancer's driver build: the same source compiled with
/// -DL4LB_DRIVER_BUILD (plain adds into per-CPU counters), which the host
/// loads in driver and generic mode; `l4lb_xdp.o` stays the object iproute2
/// and offload load.
const PERCPU_BUILD: (&str, &str, &str) = ("l4lb_xdp", "l4lb_xdp_percpu", "-DL4LB_DRIVER_BUILD");

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    for name in BPF_PROGRAMS {
        build_program(&manifest_dir, &out_dir, name, name, "");
    }
    let (source, object, flags) = PERCPU_BUILD;
    build_program(&manifest_dir, &out_dir, source, object, flags);
    // The balancer's object under the name the tests use.
    println!("cargo:rustc-env=L4LB_BPF_OBJECT={}", out_dir.join("l4lb_xdp.o").display());

    // Constants and the counter enums of include/l4lb.h (BTF carries the struct
    // layouts into the skeleton, but not #defines or enums the code only uses).
    let counter_enums = [
        CounterNames::new("l4lb_counter", "L4LB_CNT_", "COUNTER_NAMES"),
        CounterNames::new("l4lb_decap_counter", "L4LB_DECAP_CNT_", "DECAP_COUNTER_NAMES"),
        CounterNames::new("l4lb_probe_counter", "L4LB_PROBE_CNT_", "PROBE_COUNTER_NAMES"),
    ];
    let mut builder = bindgen::Builder::default()
        .header(manifest_dir.join("include/l4lb.h").display().to_string())
        .allowlist_var("L4LB_.*")
        .use_core();
    for names in &counter_enums {
        builder = builder
            .parse_callbacks(Box::new(names.clone()))
            .allowlist_type(names.enum_name)
            .constified_enum_module(names.enum_name);
    }
    builder
        .generate()
        .expect("generating constants from include/l4lb.h")
        .write_to_file(out_dir.join("l4lb_consts.rs"))
        .expect("writing l4lb_consts.rs");
    for names in &counter_enums {
        names.write(&out_dir.join(format!("{}_names.rs", names.enum_name)));
    }

    println!("cargo:rerun-if-changed=Makefile");
    for dir in ["src/bpf", "include"] {
        println!("cargo:rerun-if-changed={dir}");
        for entry in std::fs::read_dir(manifest_dir.join(dir)).expect("listing BPF sources").flatten() {
            println!("cargo:rerun-if-changed={}", entry.path().display());
        }
    }
}

/// Builds BPF object `name` from src/bpf/`source`.bpf.c with the Makefile's
/// rule (and `extra` compiler flags) and generates its skeleton.
fn build_program(manifest_dir: &std::path::Path, out_dir: &std::path::Path, source: &str, name: &str, extra: &str) {
    let source = manifest_dir.join(format!("src/bpf/{source}.bpf.c"));
    let object = out_dir.join(format!("{name}.o"));
    let status = Command::new("make")
        .arg("--no-print-directory")
        .arg("-C")
        .arg(manifest_dir)
        .arg(format!(
            "BPF_NAME={}",
            source
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.strip_suffix(".bpf"))
                .expect("src/bpf/NAME.bpf.c")
        ))
        .arg(format!("BPF_OBJ={}", object.display()))
        .arg(format!("BPF_EXTRA_CFLAGS={extra}"))
        .arg(&object)
        .status()
        .expect("running make to build a BPF object (is make installed?)");
    assert!(status.success(), "building {} failed (see the compiler output above)", source.display());
    SkeletonBuilder::new()
        .source(&source)
        .obj(&object)
        .generate(out_dir.join(format!("{name}.skel.rs")))
        .expect("generating a BPF skeleton");
    // Tests load the very object the skeleton embeds (iproute2, offload checks).
    println!("cargo:rustc-env={}_OBJECT={}", name.to_ascii_uppercase(), object.display());
}

/// Collects the members of one counter enum while bindgen parses the header,
/// so that the host's counter names follow the C enum (`L4LB_CNT_DROP_BAD_IHL`
/// becomes "drop_bad_ihl") without a hand-kept list. Written out as
/// `pub const <const_name>: [&str; N]`, indexed by value, into
/// OUT_DIR/<enum_name>_names.rs.
#[derive(Debug, Clone)]
struct CounterNames {
    enum_name: &'static str,
    /// Prefix of every member; `<prefix>MAX` (the count) is left out.
    prefix: &'static str,
    const_name: &'static str,
    members: Arc<Mutex<Vec<(i64, String)>>>,
}

impl ParseCallbacks for CounterNames {
    fn enum_variant_name(
        &self,
        enum_name: Option<&str>,
        original_variant_name: &str,
        value: EnumVariantValue,
    ) -> Option<String> {
        // bindgen names the enum "enum NAME" or "NAME" depending on the version.
        let is_this_enum = enum_name.is_some_and(|name| name.trim_start_matches("enum ") == self.enum_name);
        if let (true, Some(short)) = (is_this_enum, original_variant_name.strip_prefix(self.prefix)) {
            if short != "MAX" {
                let value = match value {
                    EnumVariantValue::Boolean(v) => v as i64,
                    EnumVariantValue::Signed(v) => v,
                    EnumVariantValue::Unsigned(v) => v as i64,
                };
                self.members.lock().unwrap().push((value, short.to_ascii_lowercase()));
            }
        }
        None
    }
}

impl CounterNames {
    fn new(enum_name: &'static str, prefix: &'static str, const_name: &'static str) -> Self {
        CounterNames { enum_name, prefix, const_name, members: Arc::default() }
    }

    fn write(&self, path: &std::path::Path) {
        let mut names = self.members.lock().unwrap().clone();
        names.sort();
        assert!(!names.is_empty(), "no members of enum {} found in include/l4lb.h", self.enum_name);
        for (expected, (value, name)) in names.iter().enumerate() {
            assert_eq!(*value, expected as i64, "enum {} must be dense from 0 ({name})", self.enum_name);
        }
        let list: Vec<String> = names.iter().map(|(_, name)| format!("{name:?}")).collect();
        let text = format!(
            "/// Names of `enum {}` members, indexed by value.\npub const {}: [&str; {}] = [{}];\n",
            self.enum_name,
            self.const_name,
            list.len(),
            list.join(", ")
        );
        std::fs::write(path, text).expect("writing counter names");
    }
}
