//! Long-term authentication (RFC 8489 §9.2) with TURN REST credentials and stateless nonces, and
//! the budget of replies to requests that are not authenticated.

use stun::attributes::{ATTR_MESSAGE_INTEGRITY, ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::error_code::{CODE_BAD_REQUEST, CODE_STALE_NONCE, CODE_UNAUTHORIZED, ErrorCode};
use stun::integrity::MessageIntegrity;
use stun::message::{Message, Setter};
use stun::textattrs::TextAttribute;

use super::codec::error;
use super::{Action, FiveTuple, Relay};
use crate::turn::credentials;
use crate::turn::nonce::NonceCheck;

/// A request that passed authentication.
pub(super) struct Authenticated {
    pub(super) username: String,
    pub(super) key: Vec<u8>,
}

impl Relay {
    /// A reply to a request that was not authenticated: rate-limited per source, and never more
    /// than 3× the request's size (no amplification).
    pub(super) fn unauthenticated_reply<'a>(
        &mut self,
        now_ms: u64,
        tuple: FiveTuple,
        request_len: usize,
        reply: Vec<u8>,
    ) -> Action<'a> {
        if !self.limits.allow_unauthenticated(tuple.client.ip(), now_ms) {
            self.stats[tuple.transport as usize].rate_limited += 1;
            return Action::None;
        }
        if reply.len() > 3 * request_len {
            self.stats[tuple.transport as usize].amplification_dropped += 1;
            return Action::None;
        }
        Action::Reply(reply)
    }

    /// Checks the long-term credentials of a TURN request; on failure, the reply to send.
    pub(super) fn authenticate(
        &mut self,
        now_ms: u64,
        tuple: FiveTuple,
        request: &mut Message,
        request_len: usize,
    ) -> Result<Authenticated, Action<'static>> {
        let now_secs = now_ms / 1000;
        let realm = self.settings.realm.clone();
        if !request.contains(ATTR_MESSAGE_INTEGRITY) {
            let reply = self.challenge(request, tuple, now_secs, CODE_UNAUTHORIZED);
            return Err(self.unauthenticated_reply(now_ms, tuple, request_len, reply));
        }
        let (Ok(username), Ok(nonce)) = (
            TextAttribute::get_from_as(request, ATTR_USERNAME),
            TextAttribute::get_from_as(request, ATTR_NONCE),
        ) else {
            let reply = error(request, CODE_BAD_REQUEST, vec![], None);
            return Err(self.unauthenticated_reply(now_ms, tuple, request_len, reply));
        };
        let fail = |relay: &mut Self, request: &Message, code: ErrorCode| {
            relay.stats_mut(tuple.transport).auth_failures += 1;
            let reply = relay.challenge(request, tuple, now_secs, code);
            Err(relay.unauthenticated_reply(now_ms, tuple, request_len, reply))
        };
        match self.nonces.check(&nonce.text, tuple.client.ip(), now_secs) {
            NonceCheck::Valid => {}
            NonceCheck::Stale => return fail(self, request, CODE_STALE_NONCE),
            NonceCheck::Invalid => return fail(self, request, CODE_UNAUTHORIZED),
        }
        let username = username.text;
        if credentials::expiry(&username).is_none_or(|expiry| expiry < now_secs) {
            return fail(self, request, CODE_UNAUTHORIZED);
        }
        for secret in &self.settings.secrets {
            let password = credentials::password(secret, &username);
            let integrity =
                MessageIntegrity::new_long_term_integrity(username.clone(), realm.clone(), password);
            if integrity.check(request).is_ok() {
                return Ok(Authenticated { username, key: integrity.0 });
            }
        }
        fail(self, request, CODE_UNAUTHORIZED)
    }

    /// A 401 or 438 with our realm and a fresh nonce for the client.
    pub(super) fn challenge(
        &self,
        request: &Message,
        tuple: FiveTuple,
        now_secs: u64,
        code: ErrorCode,
    ) -> Vec<u8> {
        let nonce = self.nonces.issue(tuple.client.ip(), now_secs);
        let attributes: Vec<Box<dyn Setter>> = vec![
            Box::new(TextAttribute::new(ATTR_REALM, self.settings.realm.clone())),
            Box::new(TextAttribute::new(ATTR_NONCE, nonce)),
        ];
        error(request, code, attributes, None)
    }
}
