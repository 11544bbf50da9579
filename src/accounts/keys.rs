//! API keys: `dk_` + 43 random URL-safe characters, stored only as a SHA-256 hash.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{quota, unix_now, Account, Accounts, AccountsError};

const KEY_PREFIX: &str = "dk_";
const ID_PREFIX: &str = "key_";
/// Characters of a key kept in clear, to recognise it in `keys list`.
const SHOWN_PREFIX_LEN: usize = 8;

/// The largest balance a key may hold, and so the most credits one command may give: 10^15.
/// (Far below where 64-bit sums overflow, which SQLite would silently turn into floats.)
pub const MAX_CREDITS: i64 = 1_000_000_000_000_000;
/// The largest daily quota: 10^9 requests.
pub const MAX_DAILY_QUOTA: i64 = 1_000_000_000;
/// Characters in a key's name at most.
pub const MAX_NAME_CHARS: usize = 200;

/// What `keys create` asks for.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub name: String,
    pub credits: i64,
    pub daily_quota: Option<i64>,
}

/// A key just created: the only time its secret exists outside the client.
#[derive(Debug)]
pub struct CreatedKey {
    pub info: KeyInfo,
    pub secret: String,
}

/// A key as `keys list` shows it (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: String,
    pub name: String,
    /// First characters of the key, e.g. `dk_AbC12`.
    pub prefix: String,
    pub balance: i64,
    pub daily_quota: Option<i64>,
    /// Accepted requests in the current UTC day.
    pub used_today: i64,
    pub created_at: i64,
    pub revoked: bool,
}

fn hash_key(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
}

const INFO_COLUMNS: &str =
    "k.id, k.name, k.key_prefix, k.balance, k.daily_quota, k.created_at, k.revoked_at, \
     COALESCE(u.requests, 0) AS used_today \
     FROM api_keys k LEFT JOIN daily_usage u ON u.key_id = k.id AND u.day = $1";

fn info_from_row(row: &AnyRow) -> Result<KeyInfo, sqlx::Error> {
    Ok(KeyInfo {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        prefix: row.try_get("key_prefix")?,
        balance: row.try_get("balance")?,
        daily_quota: row.try_get("daily_quota")?,
        used_today: row.try_get("used_today")?,
        created_at: row.try_get("created_at")?,
        revoked: row.try_get::<Option<i64>, _>("revoked_at")?.is_some(),
    })
}

impl Accounts {
    /// Create a key with starting credits and an optional daily quota.
    pub async fn create_key(&self, new: NewKey) -> Result<CreatedKey, AccountsError> {
        if !(0..=MAX_CREDITS).contains(&new.credits) {
            return Err(AccountsError::InvalidArgument(format!(
                "credits must be between 0 and {MAX_CREDITS}"
            )));
        }
        if new
            .daily_quota
            .is_some_and(|q| !(1..=MAX_DAILY_QUOTA).contains(&q))
        {
            return Err(AccountsError::InvalidArgument(format!(
                "the daily quota must be between 1 and {MAX_DAILY_QUOTA}"
            )));
        }
        check_name(&new.name)?;
        let secret = new_secret();
        let id = format!(
            "{ID_PREFIX}{}",
            Alphanumeric.sample_string(&mut rand::rng(), 12)
        );
        sqlx::query(
            "INSERT INTO api_keys (id, key_hash, key_prefix, name, balance, daily_quota, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&id)
        .bind(hash_key(&secret))
        .bind(&secret[..SHOWN_PREFIX_LEN])
        .bind(&new.name)
        .bind(new.credits)
        .bind(new.daily_quota)
        .bind(unix_now())
        .execute(&self.pool)
        .await?;
        let info = self.key_info(&id).await?;
        Ok(CreatedKey { info, secret })
    }

    /// All keys, oldest first, with today's usage.
    pub async fn list_keys(&self) -> Result<Vec<KeyInfo>, AccountsError> {
        let today = quota::day_of(chrono::Utc::now());
        let rows = sqlx::query(&format!(
            "SELECT {INFO_COLUMNS} ORDER BY k.created_at, k.id"
        ))
        .bind(today)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(info_from_row).collect::<Result<_, _>>()?)
    }

    /// One key by ID.
    pub async fn key_info(&self, id: &str) -> Result<KeyInfo, AccountsError> {
        let today = quota::day_of(chrono::Utc::now());
        let row = sqlx::query(&format!("SELECT {INFO_COLUMNS} WHERE k.id = $2"))
            .bind(today)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| AccountsError::NotFound(id.to_string()))?;
        Ok(info_from_row(&row)?)
    }

    /// The ID of a key given as the key itself (`dk_...`) or its ID (`key_...`).
    async fn resolve(&self, key_or_id: &str) -> Result<String, AccountsError> {
        let row = if key_or_id.starts_with(KEY_PREFIX) {
            sqlx::query("SELECT id FROM api_keys WHERE key_hash = $1").bind(hash_key(key_or_id))
        } else {
            sqlx::query("SELECT id FROM api_keys WHERE id = $1").bind(key_or_id)
        }
        .fetch_optional(&self.pool)
        .await?;
        let row = row.ok_or_else(|| AccountsError::NotFound(shown(key_or_id)))?;
        Ok(row.try_get("id")?)
    }

    /// Revoke a key: every later request with it gets 401. Revoking twice is not an error.
    pub async fn revoke(&self, key_or_id: &str) -> Result<KeyInfo, AccountsError> {
        let id = self.resolve(key_or_id).await?;
        sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(unix_now())
            .bind(&id)
            .execute(&self.pool)
            .await?;
        self.key_info(&id).await
    }

    /// Add credits to a key's balance.
    pub async fn add_credits(
        &self,
        key_or_id: &str,
        credits: i64,
    ) -> Result<KeyInfo, AccountsError> {
        if !(1..=MAX_CREDITS).contains(&credits) {
            return Err(AccountsError::InvalidArgument(format!(
                "credits to add must be between 1 and {MAX_CREDITS}"
            )));
        }
        let id = self.resolve(key_or_id).await?;
        // The bound is checked in the same statement, so nothing is written past it.
        let added = sqlx::query(
            "UPDATE api_keys SET balance = balance + $1 WHERE id = $2 AND balance <= $3",
        )
        .bind(credits)
        .bind(&id)
        .bind(MAX_CREDITS - credits)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if added == 0 {
            return Err(AccountsError::InvalidArgument(format!(
                "the balance would exceed the maximum of {MAX_CREDITS} credits; nothing was added"
            )));
        }
        self.key_info(&id).await
    }

    /// The account of a presented key, if it is known and not revoked.
    pub async fn authenticate(&self, secret: &str) -> Result<Account, AccountsError> {
        if !secret.starts_with(KEY_PREFIX) {
            return Err(AccountsError::UnknownKey);
        }
        let row =
            sqlx::query("SELECT id, daily_quota, revoked_at FROM api_keys WHERE key_hash = $1")
                .bind(hash_key(secret))
                .fetch_optional(&self.pool)
                .await?
                .ok_or(AccountsError::UnknownKey)?;
        if row.try_get::<Option<i64>, _>("revoked_at")?.is_some() {
            return Err(AccountsError::RevokedKey);
        }
        Ok(Account {
            id: row.try_get("id")?,
            daily_quota: row.try_get("daily_quota")?,
        })
    }
}

/// A key or ID as it may appear in a message: an ID (`key_` and letters or digits) whole,
/// anything else (a key, or a key mistyped) by its first characters only, control characters
/// escaped.
fn shown(key_or_id: &str) -> String {
    let is_id = key_or_id.starts_with(ID_PREFIX)
        && key_or_id.len() <= 40
        && key_or_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if is_id {
        return key_or_id.to_string();
    }
    let prefix: String = key_or_id.chars().take(SHOWN_PREFIX_LEN).collect();
    format!("{}...", prefix.escape_default())
}

/// Names are shown in terminals: no control characters (a newline, an escape sequence).
fn check_name(name: &str) -> Result<(), AccountsError> {
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(AccountsError::InvalidArgument(format!(
            "the name must have at most {MAX_NAME_CHARS} characters"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(AccountsError::InvalidArgument(
            "the name must not contain control characters".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::test_util::open_temp;
    use super::*;

    fn new_key(credits: i64, quota: Option<i64>) -> NewKey {
        NewKey {
            name: "t".into(),
            credits,
            daily_quota: quota,
        }
    }

    #[tokio::test]
    async fn create_authenticate_revoke() {
        let (_dir, acc) = open_temp().await;
        let created = acc.create_key(new_key(500, Some(3))).await.unwrap();
        assert!(created.secret.starts_with("dk_"));
        assert!(created.secret.len() >= 35);
        assert_eq!(created.info.balance, 500);
        assert_eq!(created.info.daily_quota, Some(3));
        assert!(created.secret.starts_with(&created.info.prefix));

        let account = acc.authenticate(&created.secret).await.unwrap();
        assert_eq!(account.id, created.info.id);
        assert!(matches!(
            acc.authenticate("dk_nope").await,
            Err(AccountsError::UnknownKey)
        ));
        assert!(matches!(
            acc.authenticate("").await,
            Err(AccountsError::UnknownKey)
        ));

        let revoked = acc.revoke(&created.info.id).await.unwrap();
        assert!(revoked.revoked);
        assert!(matches!(
            acc.authenticate(&created.secret).await,
            Err(AccountsError::RevokedKey)
        ));
    }

    #[tokio::test]
    async fn only_the_hash_is_stored() {
        let (dir, acc) = open_temp().await;
        let created = acc.create_key(new_key(1, None)).await.unwrap();
        acc.close().await;
        let mut raw = Vec::new();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            // -wal/-shm files may vanish as the pool closes.
            if let Ok(bytes) = std::fs::read(entry.unwrap().path()) {
                raw.extend(bytes);
            }
        }
        let needle = created.secret.as_bytes();
        assert!(!raw.windows(needle.len()).any(|w| w == needle));
    }

    #[tokio::test]
    async fn add_credits_by_key_or_id_and_list() {
        let (_dir, acc) = open_temp().await;
        let a = acc.create_key(new_key(10, None)).await.unwrap();
        let b = acc.create_key(new_key(0, Some(1))).await.unwrap();
        assert_eq!(acc.add_credits(&a.secret, 5).await.unwrap().balance, 15);
        assert_eq!(acc.add_credits(&b.info.id, 7).await.unwrap().balance, 7);
        assert!(matches!(
            acc.add_credits("key_missing", 1).await,
            Err(AccountsError::NotFound(_))
        ));
        assert!(matches!(
            acc.add_credits(&a.info.id, 0).await,
            Err(AccountsError::InvalidArgument(_))
        ));
        let list = acc.list_keys().await.unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list.iter().map(|k| k.balance).sum::<i64>(), 22);
    }

    #[tokio::test]
    async fn bad_arguments_are_refused() {
        let (_dir, acc) = open_temp().await;
        assert!(acc.create_key(new_key(-1, None)).await.is_err());
        assert!(acc.create_key(new_key(1, Some(0))).await.is_err());
        assert!(acc
            .create_key(new_key(MAX_CREDITS + 1, None))
            .await
            .is_err());
        assert!(acc
            .create_key(new_key(1, Some(MAX_DAILY_QUOTA + 1)))
            .await
            .is_err());
        assert!(acc.list_keys().await.unwrap().is_empty());
    }

    /// Finding 5 of issue 15: i64::MAX credits were accepted and stored as a float, after which
    /// `keys list` failed for every key. Amounts are bounded, and a refused one writes nothing.
    #[tokio::test]
    async fn credits_are_bounded_and_a_refusal_writes_nothing() {
        let (_dir, acc) = open_temp().await;
        let k = acc.create_key(new_key(10, None)).await.unwrap();
        for bad in [i64::MAX, MAX_CREDITS + 1, -5, 0] {
            let e = acc.add_credits(&k.info.id, bad).await.unwrap_err();
            assert!(matches!(e, AccountsError::InvalidArgument(_)), "{bad}: {e}");
        }
        // Up to the bound, not past it.
        acc.add_credits(&k.info.id, MAX_CREDITS - 10).await.unwrap();
        let e = acc.add_credits(&k.info.id, 1).await.unwrap_err();
        assert!(e.to_string().contains("exceed"), "{e}");
        let list = acc.list_keys().await.unwrap();
        assert_eq!(list[0].balance, MAX_CREDITS);
        // And the key still pays: a reservation is deducted exactly.
        let a = acc.authenticate(&k.secret).await.unwrap();
        let now = chrono::Utc::now();
        acc.reserve(&a, "req_x", 7, now).await.unwrap();
        assert_eq!(
            acc.key_info(&k.info.id).await.unwrap().balance,
            MAX_CREDITS - 7
        );
    }

    #[tokio::test]
    async fn names_with_control_characters_are_refused() {
        let (_dir, acc) = open_temp().await;
        for bad in ["a\nb", "\u{1b}[31mred", "tab\there", "nul\0"] {
            let mut k = new_key(1, None);
            k.name = bad.into();
            assert!(acc.create_key(k).await.is_err(), "{bad:?}");
        }
        let mut k = new_key(1, None);
        k.name = "équipe 1 — images".into();
        acc.create_key(k).await.unwrap();
    }

    #[tokio::test]
    async fn errors_show_keys_only_by_prefix() {
        let (_dir, acc) = open_temp().await;
        let secret = "dk_ThisIsASecretThatDoesNotExist0123456789abc";
        let e = acc.revoke(secret).await.unwrap_err().to_string();
        assert!(e.contains("dk_ThisI...") && !e.contains("Secret"), "{e}");
        // A key pasted without its dk_ prefix is still a secret.
        let e = acc.revoke(&secret[3..]).await.unwrap_err().to_string();
        assert!(!e.contains("Secret"), "{e}");
        let e = acc.revoke("key_missing").await.unwrap_err().to_string();
        assert!(e.contains("'key_missing'"), "{e}");
        let e = acc.revoke("x\u{1b}[2J").await.unwrap_err().to_string();
        assert!(!e.contains('\u{1b}'), "{e}");
    }
}
