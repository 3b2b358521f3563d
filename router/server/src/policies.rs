//! Binding the config file's namespaces to retention and compaction policies, and to the
//! presence limits.
//!
//! It owns turning each namespace's settings (limits, compaction, plugin bindings) into the
//! core layer's [`Policies`], with plugins from the plugin host and the built-ins as their
//! fallbacks, and its presence settings into the core layer's [`PresenceLimits`]. It must
//! never run a policy: maintenance does, in the core layer.

use std::sync::Arc;

use switchyard_core::policy::{
    ms, Bound, CompactionPolicy, KeyedCompaction, LimitsRetention, Policies, RetentionPolicy,
};
use switchyard_plugin_host::bound::{PluginCompaction, PluginRetention};
use switchyard_plugin_host::registry::Registry;

use crate::config::{Config, NamespaceConfig};
use switchyard_core::owner::{PresenceLimits, PresenceSettings};

/// The presence limits of each namespace, as the owners read them.
pub(crate) struct PresenceConfig(pub(crate) Arc<Config>);

impl PresenceSettings for PresenceConfig {
    fn limits(&self, channel: &str) -> PresenceLimits {
        let ns = self.0.namespace(channel);
        PresenceLimits {
            join_leave: ns.presence && ns.join_leave,
            max_list: ns.presence_max_list,
            join_leave_max_subscribers: ns.join_leave_max_subscribers,
        }
    }
}

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
