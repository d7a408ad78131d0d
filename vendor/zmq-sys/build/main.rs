//! libzmq, static, with CURVE through a static libsodium (htex_rs's patch of zmq-sys).
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build/main.rs");
    let lib = env::var("DEP_SODIUM_LIB").expect(
        "libsodium-sys-stable did not build libsodium from source (DEP_SODIUM_LIB unset): \
         unset SODIUM_LIB_DIR / SODIUM_USE_PKG_CONFIG",
    );
    let include = PathBuf::from(env::var("DEP_SODIUM_INCLUDE").expect("DEP_SODIUM_INCLUDE unset"));
    assert!(
        include.join("sodium.h").exists(),
        "no sodium.h in {}: libzmq would build without CURVE",
        include.display()
    );
    zeromq_src::Build::new()
        .with_libsodium(Some(zeromq_src::LibLocation::new(lib, include)))
        .build();
}
