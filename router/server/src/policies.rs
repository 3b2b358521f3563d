//! Binding the config file's namespaces to retention and compaction policies.
//!
//! It owns turning each namespace's settings (limits, compaction, plugin bindings) into the
//! core layer's [`Policies`], with plugins from the plugin host and the built-ins as their
//! fallbacks. It must never run a policy: maintenance does, in the core layer.

use std::sync::Arc;

use switchyard_core::policy::{
    ms, Bound, CompactionPolicy, KeyedCompaction, LimitsRetention, Policies, RetentionPolicy,
};
use switchyard_plugin_host::bound::{PluginCompaction, PluginRetention};
use switchyard_plugin_host::registry::Registry;

use crate::config::{Config, NamespaceConfig};

/// The bindings of every namespace of `config`, with plugins from `plugins`.
pub(crate) fn from_config(config: &Config, plugins: &Arc<Registry>) -> Policies {
    Policies::new(
        bind("defaults", &config.defaults, plugins),
        config.namespaces.iter().map(|(n, ns)| (n.clone(), bind(n, ns, plugins))).collect(),
    )
}

fn bind(name: &str, ns: &NamespaceConfig, registry: &Arc<Registry>) -> Bound {
    let limits = LimitsRetention { size: ns.history_size, ttl_ms: ms(ns.history_ttl), bytes: ns.history_bytes };
    let builtin_retention = (!limits.is_unlimited()).then(|| Arc::new(limits) as Arc<dyn RetentionPolicy>);
    let retention = match &ns.retention {
        Some(b) => Some(Arc::new(PluginRetention {
            registry: registry.clone(),
            plugin: b.plugin.clone(),
            binding: format!("{name}/retention"),
            params: b.params.to_string(),
            fallback: builtin_retention,
        }) as Arc<dyn RetentionPolicy>),
        None => builtin_retention,
    };
    let compaction = ns.compaction.as_ref().map(|c| {
        let builtin = KeyedCompaction { window_ms: c.window.map(ms), tombstone_delay_ms: ms(c.tombstone_delay) };
        let builtin = Arc::new(builtin) as Arc<dyn CompactionPolicy>;
        match &c.plugin {
            Some(plugin) => Arc::new(PluginCompaction {
                registry: registry.clone(),
                plugin: plugin.clone(),
                binding: format!("{name}/compaction"),
                params: c.params.to_string(),
                fallback: builtin,
            }) as Arc<dyn CompactionPolicy>,
            None => builtin,
        }
    });
    Bound { retention, compaction }
}
