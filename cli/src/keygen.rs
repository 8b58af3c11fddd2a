//! `hotpatch keygen KEY`: a new Ed25519 signing key (mode 0600) and its
//! public key (`KEY.pub`), for `hotpatch sign` and the trusted-keys
//! directory.

use std::io::Write;
use std::path::PathBuf;

use super::{Failure, Outcome};

/// Arguments of `hotpatch keygen`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the secret key (never overwritten); the public key
    /// goes to the same path plus `.pub`.
    pub key: PathBuf,
}

/// Runs `hotpatch keygen`.
pub fn run(a: &Args, out: &mut dyn Write) -> Outcome {
    let key = hotpatch_loader::SecretKey::generate()
        .map_err(|e| Failure::new("E_PLG_IO", format!("reading /dev/urandom: {e}"), false))?;
    let public = key.write_files(&a.key).map_err(|e| {
        Failure::new(
            "E_PLG_IO",
            format!("{}: cannot write the key: {e}", a.key.display()),
            false,
        )
    })?;
    writeln!(
        out,
        "secret key: {} (keep it private)\npublic key: {} ({})\ntrust it: copy {} into ~/.config/hotpatch/trusted-keys/",
        a.key.display(),
        public.display(),
        key.public(),
        public.display()
    )
    .map_err(|e| Failure::io(&e))
}
