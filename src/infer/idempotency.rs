//! `Idempotency-Key` for generation requests: the first request with a key runs; a repeat
//! within 24 h with the same body gets the first response (waiting while the first one still
//! runs, on whichever server shares the database) and is charged nothing; the same key with
//! another body is refused (409 `idempotency_key_reused`). Keys are per caller: an API key's
//! idempotency keys are its own.

use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{Caller, Facade, InferError};
use crate::accounts::{Accounts, IdempotencyClaim};

/// Characters an idempotency key may have at most.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 255;

/// How often a repeat asks whether the first request has finished.
const POLL: Duration = Duration::from_millis(200);

/// What the HTTP layer should do with a request that carries an idempotency key.
#[derive(Debug)]
pub enum Idempotent {
    /// Run it; [`IdempotentRun::finish`] with its response afterwards.
    Run(IdempotentRun),
    /// Answer the first request's response: its request ID and body.
    Replay { request_id: String, body: String },
}

/// A claimed idempotency key. Dropped unfinished (the client went away), the claim is given up
/// from a spawned task, so a retry runs again.
#[derive(Debug)]
pub struct IdempotentRun {
    claim: Option<(Accounts, String, String)>,
}

impl IdempotentRun {
    /// Keep `success_body` (the 200 response's body) for the repeats, or, on `None` (the
    /// request failed, and was not charged), give the key up so that a retry runs again.
    pub async fn finish(mut self, success_body: Option<&str>) {
        let Some((accounts, owner, key)) = self.claim.take() else {
            return;
        };
        let result = match success_body {
            Some(body) => accounts.complete_idempotency(&owner, &key, body).await,
            None => accounts.abandon_idempotency(&owner, &key).await,
        };
        if let Err(e) = result {
            tracing::error!("recording the idempotency key's outcome failed: {e}");
        }
    }
}

impl Drop for IdempotentRun {
    fn drop(&mut self) {
        let Some((accounts, owner, key)) = self.claim.take() else {
            return;
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = accounts.abandon_idempotency(&owner, &key).await;
            });
        }
    }
}

impl Facade {
    /// Claim `key` for this caller and body: run, replay, or wait for the first request.
    pub async fn idempotent(
        &self,
        caller: &Caller,
        key: &str,
        body: &[u8],
        request_id: &str,
    ) -> Result<Idempotent, InferError> {
        let valid = !key.is_empty()
            && key.chars().count() <= MAX_IDEMPOTENCY_KEY_CHARS
            && key.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
        if !valid {
            return Err(InferError::InvalidIdempotencyKey);
        }
        let Some(accounts) = &self.ledger else {
            return Err(InferError::Internal(
                "Idempotency-Key without an accounts database".into(),
            ));
        };
        let owner = match caller {
            Caller::Key(account) => account.id.as_str(),
            Caller::Anonymous => "",
        };
        let hash = hex::encode(Sha256::digest(body));
        loop {
            match accounts
                .claim_idempotency(owner, key, &hash, request_id)
                .await?
            {
                IdempotencyClaim::Run => {
                    return Ok(Idempotent::Run(IdempotentRun {
                        claim: Some((accounts.clone(), owner.to_string(), key.to_string())),
                    }))
                }
                IdempotencyClaim::Done(first) => {
                    return Ok(Idempotent::Replay {
                        request_id: first.request_id,
                        body: first.body,
                    })
                }
                IdempotencyClaim::Mismatch => return Err(InferError::IdempotencyKeyReused),
                IdempotencyClaim::Running => tokio::time::sleep(POLL).await,
            }
        }
    }
}
