//! What the agent says about its plugins and sites.

use hotpatch_loader::Plugin;
use hotpatch_symbolizer::Registry;

use super::Control;
use super::sites::SiteEntry;
use crate::protocol::{ListInfo, PluginInfo, SiteInfo, SiteState};

impl SiteEntry {
    pub(super) fn describe(&self) -> SiteInfo {
        SiteInfo {
            id: self.id,
            name: self.name.clone(),
            target: self.target.spec(),
            target_addr: format!("{:#x}", self.target.addr),
            target_size: self.target.size,
            with: self.with.spec(),
            with_addr: format!("{:#x}", self.with.addr),
            state: if self.site.is_enabled() {
                SiteState::Enabled
            } else {
                SiteState::Disabled
            },
            trampoline: format!("{:#x}", self.site.original()),
            signature: None,
            previous: None,
            canary: self.canary.as_ref().map(|c| c.info()),
        }
    }
}

impl Control {
    pub(super) fn list(&self) -> ListInfo {
        ListInfo {
            plugins: self.plugins.values().map(describe_plugin).collect(),
            sites: self.sites.iter().map(SiteEntry::describe).collect(),
        }
    }
}

pub(super) fn describe_plugin(p: &Plugin) -> PluginInfo {
    let pins = p
        .module_id()
        .and_then(|id| Registry::global().module(id))
        .map_or(0, |m| m.pins);
    PluginInfo {
        name: p.name().to_owned(),
        version: p.version().to_owned(),
        path: p.path().display().to_string(),
        base: format!("{:#x}", p.base()),
        module_id: p.module_id().map(|m| m.0),
        tls: p.tls().is_some(),
        pins,
    }
}
