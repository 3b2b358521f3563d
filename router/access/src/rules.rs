//! Channel permission rules: who may subscribe to, publish to and read the history of a
//! channel, by its namespace.
//!
//! It owns the four rules (`public`, `user` inboxes, `dialog`s, the token's `allowlist`),
//! which rule a channel falls under, and the canonical form of dialog names. It is pure: it
//! must never do I/O, never look at tokens' signatures (that is [`crate::auth`]) and never be
//! consulted when auth is off.

use serde::Deserialize;

use crate::auth::{is_valid_user_id, Identity};
use switchyard_proto::protocol::{ErrorCode, OpError};

/// A namespace's rule (`[namespaces.X] rule = "..."`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Anyone connected may subscribe, publish and read history.
    Public,
    /// `NS:{id}` is user `id`'s inbox: only `id` may subscribe or read history; any
    /// authenticated user may publish (a direct message).
    User,
    /// `NS:{a}:{b}` with `a < b` is the dialog of users a and b: only they may do anything.
    /// Any other spelling of the name is `bad_request`.
    Dialog,
    /// Only channels in the token's `channels` claim.
    Allowlist,
}

/// What a client wants to do on a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `subscribe`, `commit` and long-poll.
    Subscribe,
    /// `publish`.
    Publish,
    /// `history`.
    History,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Action::Subscribe => "subscribe to",
            Action::Publish => "publish to",
            Action::History => "read the history of",
        }
    }
}

/// The rules of every namespace that names one, and the default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rules {
    /// `defaults.rule`.
    pub default: Option<Rule>,
    /// `namespaces.<ns>.rule`, for the namespaces that set one.
    pub namespaces: std::collections::HashMap<String, Rule>,
}

impl Rules {
    /// The rule of `channel`: its namespace's `rule`, else `user` for the `user` namespace
    /// and `dialog` for the `dialog` namespace, else `defaults.rule`, else `allowlist`.
    pub fn rule_of(&self, channel: &str) -> Rule {
        let ns = switchyard_proto::channel::namespace(channel);
        if let Some(rule) = ns.and_then(|ns| self.namespaces.get(ns)) {
            return *rule;
        }
        match ns {
            Some("user") => Rule::User,
            Some("dialog") => Rule::Dialog,
            _ => self.default.unwrap_or(Rule::Allowlist),
        }
    }
}

/// The canonical dialog channel of two users in namespace `ns`: ids sorted.
pub fn dialog_name(ns: &str, a: &str, b: &str) -> String {
    let (a, b) = if a <= b { (a, b) } else { (b, a) };
    format!("{ns}:{a}:{b}")
}

fn forbidden(op: Action, channel: &str, why: &str) -> OpError {
    OpError::new(ErrorCode::Forbidden, format!("may not {} {channel}: {why}", op.verb()))
}

/// Checks `op` on `channel` for `who` under `rule`: `forbidden` when not allowed,
/// `bad_request` when the name does not fit the rule (e.g. a non-canonical dialog).
pub fn check(rule: Rule, op: Action, channel: &str, who: &Identity) -> Result<(), OpError> {
    let rest = channel.split_once(':').map(|(_, rest)| rest);
    match rule {
        Rule::Public => Ok(()),
        Rule::User => {
            let id = rest.filter(|id| is_valid_user_id(id)).ok_or_else(|| {
                OpError::bad_request(format!("{channel} is not an inbox name: expected NAMESPACE:{{user id}}"))
            })?;
            if op == Action::Publish || id == &*who.user {
                Ok(())
            } else {
                Err(forbidden(op, channel, "only the inbox's owner may read it"))
            }
        }
        Rule::Dialog => {
            let bad = || {
                OpError::bad_request(format!(
                    "{channel} is not a dialog name: expected NAMESPACE:{{a}}:{{b}} with two different user ids"
                ))
            };
            let (a, b) = rest.and_then(|r| r.split_once(':')).ok_or_else(bad)?;
            if !is_valid_user_id(a) || !is_valid_user_id(b) || a == b {
                return Err(bad());
            }
            if a > b {
                let ns = channel.split_once(':').map_or("", |(ns, _)| ns);
                return Err(OpError::bad_request(format!(
                    "dialog names list the user ids sorted: use {}",
                    dialog_name(ns, a, b)
                )));
            }
            if *who.user == *a || *who.user == *b {
                Ok(())
            } else {
                Err(forbidden(op, channel, "only the dialog's two users may use it"))
            }
        }
        Rule::Allowlist => {
            if who.allows(channel) {
                Ok(())
            } else {
                Err(forbidden(op, channel, "not in the token's `channels` allow-list"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(user: &str, channels: Option<&[&str]>) -> Identity {
        Identity {
            user: user.into(),
            channels: channels.map(|c| c.iter().map(|s| s.to_string()).collect::<Vec<_>>().into()),
            exp: 0,
            info: None,
        }
    }

    #[test]
    fn inbox_rule() {
        let bob = who("bob", None);
        let carol = who("carol", None);
        assert!(check(Rule::User, Action::Subscribe, "user:bob", &bob).is_ok());
        assert!(check(Rule::User, Action::History, "user:bob", &bob).is_ok());
        assert!(check(Rule::User, Action::Publish, "user:bob", &carol).is_ok());
        assert_eq!(check(Rule::User, Action::Subscribe, "user:bob", &carol).unwrap_err().code, ErrorCode::Forbidden);
        assert_eq!(check(Rule::User, Action::History, "user:bob", &carol).unwrap_err().code, ErrorCode::Forbidden);
        assert_eq!(check(Rule::User, Action::Publish, "user:a:b", &carol).unwrap_err().code, ErrorCode::BadRequest);
        assert_eq!(check(Rule::User, Action::Publish, "user", &carol).unwrap_err().code, ErrorCode::BadRequest);
    }

    #[test]
    fn dialog_rule() {
        let (a, b, c) = (who("alice", None), who("bob", None), who("carol", None));
        for op in [Action::Subscribe, Action::Publish, Action::History] {
            assert!(check(Rule::Dialog, op, "dialog:alice:bob", &a).is_ok());
            assert!(check(Rule::Dialog, op, "dialog:alice:bob", &b).is_ok());
            assert_eq!(check(Rule::Dialog, op, "dialog:alice:bob", &c).unwrap_err().code, ErrorCode::Forbidden);
            let e = check(Rule::Dialog, op, "dialog:bob:alice", &a).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(e.message.contains("dialog:alice:bob"), "{e:?}");
        }
        for bad in ["dialog:alice", "dialog:alice:alice", "dialog:a:b:c", "dialog::bob"] {
            assert_eq!(check(Rule::Dialog, Action::Publish, bad, &a).unwrap_err().code, ErrorCode::BadRequest, "{bad}");
        }
        assert_eq!(dialog_name("dialog", "zed", "amy"), "dialog:amy:zed");
    }

    #[test]
    fn allowlist_and_public() {
        let a = who("alice", Some(&["news:1", "team:*"]));
        assert!(check(Rule::Allowlist, Action::Subscribe, "news:1", &a).is_ok());
        assert!(check(Rule::Allowlist, Action::Publish, "team:x", &a).is_ok());
        assert!(check(Rule::Allowlist, Action::History, "news:2", &a).is_err());
        assert!(check(Rule::Allowlist, Action::History, "news:1", &who("bob", None)).is_err());
        assert!(check(Rule::Public, Action::Publish, "anything", &who("bob", None)).is_ok());
    }

    #[test]
    fn rule_resolution() {
        let c = Rules {
            default: Some(Rule::Public),
            namespaces: [("room".to_string(), Rule::Allowlist), ("inbox".to_string(), Rule::User)].into(),
        };
        assert_eq!(c.rule_of("room:1"), Rule::Allowlist);
        assert_eq!(c.rule_of("inbox:bob"), Rule::User);
        assert_eq!(c.rule_of("user:bob"), Rule::User);
        assert_eq!(c.rule_of("dialog:a:b"), Rule::Dialog);
        assert_eq!(c.rule_of("misc:1"), Rule::Public);
        assert_eq!(Rules::default().rule_of("misc:1"), Rule::Allowlist);
    }
}
