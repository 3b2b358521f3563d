//! Plugins bound to a namespace or to the balancer, as the core layer's policy traits.
//!
//! It owns the adapters that implement [`RetentionPolicy`] and [`CompactionPolicy`] by
//! calling a plugin through the [`Registry`], validating its decision with the same rules
//! as the built-ins, and falling back (for the balancer, the caller falls back) to the namespace's built-in policy whenever the
//! plugin is missing, quarantined or fails. It must never return an error for a plugin
//! failure: the round always gets a decision.

use std::sync::Arc;

use switchyard_sdk::{CompactionDecision, CompactionInput, RetentionDecision, RetentionInput};

use switchyard_core::policy::{
    validate_balance, validate_compaction, validate_retention, BalancePlugins, CompactionPolicy, PolicyError,
    RetentionPolicy,
};
use switchyard_sdk::{BalanceDecision, BalanceInput};

use crate::host::Kind;
use crate::registry::{Fallback, Registry};

/// A retention plugin with its params and the built-in fallback.
pub struct PluginRetention {
    /// The registry holding the plugin.
    pub registry: Arc<Registry>,
    /// Plugin name (file stem).
    pub plugin: String,
    /// Where it is bound (`namespace/retention`): health is tracked per binding.
    pub binding: String,
    /// Params as JSON text.
    pub params: String,
    /// Used when the plugin gives no decision (None: keep everything).
    pub fallback: Option<Arc<dyn RetentionPolicy>>,
}

/// A compaction plugin with its params and the built-in fallback.
pub struct PluginCompaction {
    /// The registry holding the plugin.
    pub registry: Arc<Registry>,
    /// Plugin name (file stem).
    pub plugin: String,
    /// Where it is bound (`namespace/compaction`): health is tracked per binding.
    pub binding: String,
    /// Params as JSON text.
    pub params: String,
    /// Used when the plugin gives no decision.
    pub fallback: Arc<dyn CompactionPolicy>,
}

fn note(plugin: &str, kind: Kind, why: &Fallback) {
    // Failures are logged and counted by the registry; a missing plugin is worth a debug line.
    if matches!(why, Fallback::NotLoaded | Fallback::NoSuchKind) {
        tracing::debug!(plugin, kind = kind.as_str(), ?why, "plugin not available; built-in policy used");
    }
}

/// Keyed messages a compaction plugin is shown per round: a window the default 50 ms
/// deadline can handle (about 15 ms for 10,000 with the example plugin).
const PLUGIN_COMPACTION_WINDOW: usize = 20_000;

impl RetentionPolicy for PluginRetention {
    fn name(&self) -> &str {
        &self.plugin
    }

    fn skips_idle_channels(&self) -> bool {
        true
    }

    fn decide(&self, input: &RetentionInput) -> Result<RetentionDecision, PolicyError> {
        let check = |d: &RetentionDecision| validate_retention(&self.plugin, input, d).map_err(|e| e.to_string());
        match self.registry.call(&self.plugin, &self.binding, Kind::Retention, &self.params, input, check) {
            Ok(d) => Ok(d),
            Err(why) => {
                note(&self.plugin, Kind::Retention, &why);
                match &self.fallback {
                    Some(f) => f.decide(input),
                    None => Ok(RetentionDecision::Keep),
                }
            }
        }
    }
}

impl CompactionPolicy for PluginCompaction {
    fn name(&self) -> &str {
        &self.plugin
    }

    fn max_window(&self) -> usize {
        PLUGIN_COMPACTION_WINDOW
    }

    fn decide(&self, input: &CompactionInput) -> Result<CompactionDecision, PolicyError> {
        let check = |d: &CompactionDecision| validate_compaction(&self.plugin, input, d).map_err(|e| e.to_string());
        match self.registry.call(&self.plugin, &self.binding, Kind::Compaction, &self.params, input, check) {
            Ok(d) => Ok(d),
            Err(why) => {
                note(&self.plugin, Kind::Compaction, &why);
                self.fallback.decide(input)
            }
        }
    }
}

impl BalancePlugins for Registry {
    fn balance(&self, plugin: &str, params: &str, input: &BalanceInput) -> Result<BalanceDecision, PolicyError> {
        let check = |d: &BalanceDecision| validate_balance(plugin, input, d).map_err(|e| e.to_string());
        // A plugin call may take its whole deadline: keep it off the runtime's worker.
        tokio::task::block_in_place(|| self.call(plugin, "balancer", Kind::Balance, params, input, check))
            .map_err(|why| PolicyError::NoDecision { policy: plugin.into(), reason: format!("{why:?}") })
    }
}
