//! Plugins bound to a namespace or to the balancer, as the core layer's policy traits.
//!
//! It owns the adapters that implement [`RetentionPolicy`] and [`CompactionPolicy`] by
//! calling a plugin through the [`Registry`], validating its decision with the same rules
//! as the built-ins, and falling back (for the balancer, the caller falls back) to the namespace's built-in policy whenever the
//! plugin is missing, quarantined or fails. A round's payload source (from
//! `decide_many_with`) is passed to the call, for a v2 guest's `switchyard.payload`. It must
//! never return an error for a plugin failure: the round always gets a decision.

use std::sync::Arc;

use switchyard_sdk::{CompactionDecision, CompactionInput, RetentionDecision, RetentionInput};

use switchyard_core::policy::{
    validate_balance, validate_compaction, validate_followers, validate_retention, BalancePlugins, CompactionPolicy,
    Payloads, PolicyError, RetentionPolicy,
};
use switchyard_sdk::{BalanceInput, BalancePlan, ReplicaInput};

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

/// Most messages in one batched plugin call, over all its channels: the channels of one
/// round go to a (v2) plugin in as few calls as fit under it, so a call stays well within
/// the deadline and the memory cap.
const BATCH_MESSAGES: usize = 20_000;
/// Most channels in one batched plugin call.
const BATCH_CHANNELS: usize = 1_024;

/// Consecutive ranges of `inputs`, each within [`BATCH_MESSAGES`] (a lone bigger input gets
/// a range of its own) and [`BATCH_CHANNELS`].
fn batches<T>(inputs: &[T], messages: impl Fn(&T) -> usize) -> Vec<std::ops::Range<usize>> {
    let (mut ranges, mut start, mut total) = (Vec::new(), 0, 0);
    for (i, input) in inputs.iter().enumerate() {
        let n = messages(input);
        if i > start && (total + n > BATCH_MESSAGES || i - start == BATCH_CHANNELS) {
            ranges.push(start..i);
            (start, total) = (i, 0);
        }
        total += n;
    }
    if start < inputs.len() {
        ranges.push(start..inputs.len());
    }
    ranges
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
        let check = |d: &RetentionDecision| validate_retention(&self.plugin, input, d);
        match self.registry.call(&self.plugin, &self.binding, Kind::Retention, &self.params, input, check) {
            Ok(d) => Ok(d),
            Err(why) => self.fall_back(input, &why),
        }
    }

    fn decide_many(&self, inputs: &[RetentionInput]) -> Vec<Result<RetentionDecision, PolicyError>> {
        self.decide_batches(inputs, None)
    }

    fn decide_many_with(
        &self,
        inputs: &[RetentionInput],
        payloads: &Arc<dyn Payloads>,
    ) -> Vec<Result<RetentionDecision, PolicyError>> {
        self.decide_batches(inputs, Some(payloads))
    }
}

impl PluginRetention {
    /// One round's channels in as few calls as fit; a v2 guest reads payloads through
    /// `payloads` when given.
    fn decide_batches(
        &self,
        inputs: &[RetentionInput],
        payloads: Option<&Arc<dyn Payloads>>,
    ) -> Vec<Result<RetentionDecision, PolicyError>> {
        let check = |i: &RetentionInput, d: &RetentionDecision| validate_retention(&self.plugin, i, d);
        let (plugin, binding, params) = (&self.plugin, &self.binding, &self.params);
        let mut out = Vec::with_capacity(inputs.len());
        for range in batches(inputs, |i| i.oldest.len()) {
            let batch: Vec<&RetentionInput> = inputs[range].iter().collect();
            let answers =
                self.registry.call_many_with(plugin, binding, Kind::Retention, params, &batch, payloads, check);
            out.extend(batch.iter().zip(answers).map(|(input, r)| r.or_else(|why| self.fall_back(input, &why))));
        }
        out
    }

    fn fall_back(&self, input: &RetentionInput, why: &Fallback) -> Result<RetentionDecision, PolicyError> {
        note(&self.plugin, Kind::Retention, why);
        match &self.fallback {
            Some(f) => f.decide(input),
            None => Ok(RetentionDecision::Keep),
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
        let check = |d: &CompactionDecision| validate_compaction(&self.plugin, input, d);
        match self.registry.call(&self.plugin, &self.binding, Kind::Compaction, &self.params, input, check) {
            Ok(d) => Ok(d),
            Err(why) => {
                note(&self.plugin, Kind::Compaction, &why);
                self.fallback.decide(input)
            }
        }
    }

    fn decide_many(&self, inputs: &[CompactionInput]) -> Vec<Result<CompactionDecision, PolicyError>> {
        self.decide_batches(inputs, None)
    }

    fn decide_many_with(
        &self,
        inputs: &[CompactionInput],
        payloads: &Arc<dyn Payloads>,
    ) -> Vec<Result<CompactionDecision, PolicyError>> {
        self.decide_batches(inputs, Some(payloads))
    }
}

impl PluginCompaction {
    /// One round's channels in as few calls as fit; a v2 guest reads payloads through
    /// `payloads` when given.
    fn decide_batches(
        &self,
        inputs: &[CompactionInput],
        payloads: Option<&Arc<dyn Payloads>>,
    ) -> Vec<Result<CompactionDecision, PolicyError>> {
        let check = |i: &CompactionInput, d: &CompactionDecision| validate_compaction(&self.plugin, i, d);
        let (plugin, binding, params) = (&self.plugin, &self.binding, &self.params);
        let mut out = Vec::with_capacity(inputs.len());
        for range in batches(inputs, |i| i.window.len()) {
            let batch: Vec<&CompactionInput> = inputs[range].iter().collect();
            let answers =
                self.registry.call_many_with(plugin, binding, Kind::Compaction, params, &batch, payloads, check);
            out.extend(batch.iter().zip(answers).map(|(input, r)| {
                r.or_else(|why| {
                    note(&self.plugin, Kind::Compaction, &why);
                    self.fallback.decide(input)
                })
            }));
        }
        out
    }
}

impl BalancePlugins for Registry {
    fn balance(
        &self,
        plugin: &str,
        params: &str,
        input: &BalanceInput,
        replicas: &ReplicaInput,
    ) -> Result<BalancePlan, PolicyError> {
        // Invalid followers make the whole answer invalid (one failure of the binding): the
        // round falls back to the built-in owners and followers, as for any bad answer.
        let check = |plan: &BalancePlan| {
            validate_balance(plugin, input, &plan.decision)?;
            match &plan.followers {
                Some(f) => validate_followers(plugin, input, replicas, &plan.decision.owners, f),
                None => Ok(()),
            }
        };
        // A plugin call may take its whole deadline: keep it off the runtime's worker.
        let run = || self.call_balance(plugin, "balancer", params, input, replicas, check);
        let outcome = match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::block_in_place(run),
            Err(_) => run(),
        };
        outcome.map_err(|why| PolicyError::NoDecision { policy: plugin.into(), reason: format!("{why:?}") })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn batches_stay_within_the_message_and_channel_caps() {
        let sizes = [10_000, 9_000, 2_000, 30_000, 0, 5];
        let ranges = super::batches(&sizes, |n| *n);
        assert_eq!(ranges, vec![0..2, 2..3, 3..4, 4..6]);
        let many = vec![1usize; 2_500];
        let ranges = super::batches(&many, |n| *n);
        assert_eq!(ranges, vec![0..1024, 1024..2048, 2048..2500]);
        assert!(super::batches::<usize>(&[], |n| *n).is_empty());
    }
}
