//! `hotpatch sign PLUGIN --key KEY`: writes the detached signature
//! `PLUGIN.sig`.

use std::io::Write;
use std::path::PathBuf;

use super::{Failure, Outcome};

/// Arguments of `hotpatch sign`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The plugin's `.so`.
    pub plugin: PathBuf,
    /// The secret key (from `hotpatch keygen`).
    #[arg(long)]
    pub key: PathBuf,
}

/// Runs `hotpatch sign`.
pub fn run(a: &Args, out: &mut dyn Write) -> Outcome {
    let key = hotpatch_loader::SecretKey::read_file(&a.key)
        .map_err(|e| Failure::new(e.code(), e.to_string(), false))?;
    let sig = hotpatch_loader::sign_file(&a.plugin, &key).map_err(|e| {
        Failure::new(
            "E_PLG_IO",
            format!("{}: cannot sign: {e}", a.plugin.display()),
            false,
        )
    })?;
    writeln!(out, "{} (key {})", sig.display(), key.public()).map_err(|e| Failure::io(&e))
}
