//! Plugins loaded through the agent: `load` and `unload`.

use hotpatch_loader::UnloadOutcome;

use super::replies::describe_plugin;
use super::{Control, Fallible};
use crate::protocol::{
    Coded, E_AGENT_BAD_ARGS, E_AGENT_NO_SUCH_PLUGIN, ErrorBody, PluginInfo, UnloadInfo, reply,
};

impl Control {
    pub(super) fn load(&mut self, path: &str) -> Fallible<PluginInfo> {
        if path.is_empty() {
            return Err(ErrorBody::new(E_AGENT_BAD_ARGS, "empty plugin path"));
        }
        let p = hotpatch_loader::load(path, &self.policy).map_err(|e| e.to_body())?;
        let v = describe_plugin(&p);
        // The loader refuses a second plugin of the same name
        // (E_PLG_ALREADY_LOADED), so names are unique here.
        self.plugins.insert(p.name().to_owned(), p);
        Ok(v)
    }

    pub(super) fn unload(&mut self, name: &str) -> Fallible<UnloadInfo> {
        let users: Vec<String> = self
            .sites
            .iter()
            .filter(|s| {
                (s.with.plugin && s.with.module == name)
                    || (s.target.plugin && s.target.module == name)
            })
            .map(|s| s.name.clone())
            .collect();
        if !users.is_empty() {
            return Err(hotpatch_loader::Error::InUse {
                name: name.to_owned(),
                reason: format!("patch site(s) {} jump into it", users.join(", ")),
            }
            .to_body());
        }
        let p = self
            .plugins
            .remove(name)
            .ok_or_else(|| self.no_plugin(name))?;
        match p.unload() {
            Ok(u) => {
                let (outcome, reason) = match &u.outcome {
                    UnloadOutcome::Unmapped => (reply::UnloadOutcome::Unmapped, None),
                    UnloadOutcome::Retained(r) => {
                        (reply::UnloadOutcome::Retained, Some(r.to_string()))
                    }
                };
                Ok(UnloadInfo {
                    name: u.name,
                    outcome,
                    reason,
                    shutdown_error: u.shutdown_error.as_ref().map(ToString::to_string),
                    dlclose_error: u.dlclose_error,
                })
            }
            Err(r) => {
                let e = r.error.to_body();
                let hotpatch_loader::Refused { plugin, .. } = *r;
                self.plugins.insert(name.to_owned(), plugin);
                Err(e)
            }
        }
    }

    pub(super) fn no_plugin(&self, name: &str) -> ErrorBody {
        ErrorBody::new(
            E_AGENT_NO_SUCH_PLUGIN,
            format!(
                "no plugin named {name:?} was loaded through the agent (loaded: {})",
                if self.plugins.is_empty() {
                    "none".to_owned()
                } else {
                    self.plugins.keys().cloned().collect::<Vec<_>>().join(", ")
                }
            ),
        )
    }
}
