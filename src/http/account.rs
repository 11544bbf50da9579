//! GET /v1/account: the calling key's remaining credits and quota (the playground shows them).

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use super::error::ApiError;
use super::extract::Authed;
use super::AppState;

/// The caller's standing.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AccountResponse {
    pub success: bool,
    /// `open` (no keys, nothing is charged) or `keys`.
    pub auth: &'static str,
    /// Credits left on the key (keys mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<i64>,
    /// Requests per UTC day at most (keys mode; absent: unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_quota: Option<i64>,
    /// Requests accepted today, UTC (keys mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_today: Option<i64>,
}

/// GET /v1/account.
#[utoipa::path(
    get,
    path = "/v1/account",
    tag = "hosted",
    responses(
        (status = 200, description = "The key's credits and quota (or `auth: open`)", body = AccountResponse),
        (status = 401, description = "invalid_api_key", body = super::openapi::ErrorDoc),
    ),
    security((), ("bearer" = []))
)]
pub async fn account(
    State(state): State<AppState>,
    Authed(caller): Authed,
) -> Result<Json<AccountResponse>, ApiError> {
    let standing = state.facade.balance(&caller).await?;
    Ok(Json(match standing {
        None => AccountResponse {
            success: true,
            auth: "open",
            credits: None,
            daily_quota: None,
            used_today: None,
        },
        Some((credits, daily_quota, used_today)) => AccountResponse {
            success: true,
            auth: "keys",
            credits: Some(credits),
            daily_quota,
            used_today: Some(used_today),
        },
    }))
}
