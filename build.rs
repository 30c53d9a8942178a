//! Generates `include/fdcast.h` from the `ffi` module with cbindgen, so the header can never
//! drift from the code. CI regenerates it and fails when the committed copy differs.

use std::env;
use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets this"));
    let header = crate_dir.join("include").join("fdcast.h");
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-changed=build.rs");
    // The shared library's soname, libfdcast.so.<major>, as `make install` names it (README:
    // Install). Programs linked with -lfdcast record this name, not the unversioned one.
    println!(
        "cargo:rustc-cdylib-link-arg=-Wl,-soname,libfdcast.so.{}",
        env::var("CARGO_PKG_VERSION_MAJOR").expect("cargo sets this")
    );

    let mut config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("cbindgen.toml is readable and valid");
    let version =
        |part: &str| env::var(format!("CARGO_PKG_VERSION_{part}")).expect("cargo sets this");
    config.after_includes = Some(format!(
        "{}\n#define FDCAST_VERSION_MAJOR {}\n#define FDCAST_VERSION_MINOR {}\n#define FDCAST_VERSION_PATCH {}\n#define FDCAST_VERSION_STRING \"{}\"\n",
        config.after_includes.clone().unwrap_or_default(),
        version("MAJOR"),
        version("MINOR"),
        version("PATCH"),
        env::var("CARGO_PKG_VERSION").expect("cargo sets this"),
    ));
    let bindings = cbindgen::Builder::new()
        .with_src(crate_dir.join("src").join("ffi").join("mod.rs"))
        .with_config(config)
        .generate()
        .expect("cbindgen parses the ffi module");
    // Write only on change, so an unchanged header keeps its mtime and never dirties a tree.
    bindings.write_to_file(&header);
}
